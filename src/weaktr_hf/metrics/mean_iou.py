"""Mean IoU for semantic segmentation, as an `evaluate` metric module and a streaming confusion matrix.

`evaluate.load(<path to this file>)` copies this file into its module cache and imports it there, so the file stands
alone: no imports from the weaktr_hf package. The package imports the same functions from here
(`weaktr_hf.metrics`), so the IoU arithmetic is written once, in `metrics_from_confusion_matrix`.

Classes absent from both predictions and references get a NaN IoU and are skipped by the mean, as the WeakTr
authors do on COCO (their raw-id layout has 11 ids that never occur).
"""

import numpy as np

try:
    import datasets
    import evaluate
except ImportError:  # the confusion-matrix functions below work without the training extra
    evaluate = None

# Masks mark unlabelled pixels with 255 (weaktr_hf.labels.IGNORE_INDEX); repeated here because this file is standalone.
DEFAULT_IGNORE_INDEX = 255


def _as_int_array(x, name):
    """A numpy integer array from a numpy array, a (CPU or GPU) torch tensor, a PIL image or nested lists."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool:
        x = x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {x.dtype}; pass an argmax'ed label map.")
    return x


def confusion_matrix(predictions, references, num_labels, ignore_index=DEFAULT_IGNORE_INDEX):
    """Pixel counts of one label map pair, shape (num_labels, num_labels + 1): row = reference, column = prediction.

    Pixels whose reference is `ignore_index` are not counted. A prediction equal to `ignore_index` (an undecided
    pixel, e.g. in a pseudo-label) lands in the extra last column: it is a miss for the reference class and counts
    as no class's prediction. Matrices of several images (or processes) add up.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
    predictions = _as_int_array(predictions, "predictions")
    references = _as_int_array(references, "references")
    if predictions.shape != references.shape:
        raise ValueError(
            f"predictions of shape {predictions.shape} and references of shape {references.shape} differ; resize the "
            "prediction to the reference mask (nearest for labels, bilinear on logits) before scoring."
        )
    valid = references != ignore_index
    references = references[valid].astype(np.int64)
    predictions = predictions[valid].astype(np.int64)
    if references.size and (references.min() < 0 or references.max() >= num_labels):
        bad = references[(references < 0) | (references >= num_labels)][0]
        raise ValueError(
            f"reference label {bad} is outside 0..{num_labels - 1} and is not ignore_index={ignore_index}; "
            "check num_labels (background included) and the dataset's label layout."
        )
    undecided = predictions == ignore_index
    out_of_range = ~undecided & ((predictions < 0) | (predictions >= num_labels))
    if out_of_range.any():
        bad = predictions[out_of_range][0]
        raise ValueError(
            f"predicted label {bad} is outside 0..{num_labels - 1} and is not ignore_index={ignore_index}; "
            "check num_labels (background included)."
        )
    predictions[undecided] = num_labels
    counts = np.bincount(references * (num_labels + 1) + predictions, minlength=num_labels * (num_labels + 1))
    return counts.reshape(num_labels, num_labels + 1)


def metrics_from_confusion_matrix(matrix, nan_to_num=None):
    """Mean IoU, per-class IoU and accuracy, and overall pixel accuracy from a `confusion_matrix` (summed or not).

    IoU_c = TP / (reference pixels of c + predicted pixels of c - TP); accuracy_c = TP / reference pixels of c.
    A class with a zero denominator gets NaN and is left out of the means. `nan_to_num`, if given, replaces the NaN
    entries of the per-class arrays only (the means still skip those classes).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != matrix.shape[0] + 1:
        raise ValueError(
            f"expected a confusion matrix of shape (num_labels, num_labels + 1) from confusion_matrix(), got "
            f"{matrix.shape}."
        )
    num_labels = matrix.shape[0]
    true_positive = np.diagonal(matrix[:, :num_labels])
    reference_area = matrix.sum(axis=1)
    predicted_area = matrix[:, :num_labels].sum(axis=0)
    union = reference_area + predicted_area - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_positive / union
        accuracy = true_positive / reference_area
    total = reference_area.sum()
    # np.nanmean warns on an all-NaN slice; an empty evaluation has no defined mean, so say NaN quietly.
    mean_iou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    mean_accuracy = float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan")
    overall_accuracy = float(true_positive.sum() / total) if total > 0 else float("nan")
    if nan_to_num is not None:
        iou = np.nan_to_num(iou, nan=nan_to_num)
        accuracy = np.nan_to_num(accuracy, nan=nan_to_num)
    return {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_accuracy,
        "overall_accuracy": overall_accuracy,
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


class ConfusionMatrix:
    """Streaming mean-IoU accumulator: `update` per image or batch, `merge` across processes, `compute` at the end.

    For distributed evaluation, either sum `matrix` over ranks (e.g. `accelerator.reduce(torch.from_numpy(m),
    "sum")`) or gather per-image matrices with `gather_for_metrics`, which also drops the samples a sampler
    duplicated to even out the last batch.
    """

    def __init__(self, num_labels, ignore_index=DEFAULT_IGNORE_INDEX):
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
        self.num_labels = int(num_labels)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_labels, self.num_labels + 1), dtype=np.int64)

    def update(self, predictions, references):
        """Count one label map pair, or a batch of them stacked along the first axis (same shapes)."""
        self.matrix += confusion_matrix(predictions, references, self.num_labels, self.ignore_index)
        return self

    def merge(self, other):
        """Add another accumulator's counts (or a raw matrix, e.g. one gathered from another process) into this one."""
        matrix = other.matrix if isinstance(other, ConfusionMatrix) else np.asarray(other)
        if isinstance(other, ConfusionMatrix) and other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge ignore_index={other.ignore_index} into ignore_index={self.ignore_index}.")
        if hasattr(matrix, "detach"):
            matrix = matrix.detach().cpu().numpy()
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge a confusion matrix of shape {matrix.shape} into {self.matrix.shape}.")
        self.matrix += matrix.astype(np.int64)
        return self

    def __add__(self, other):
        return ConfusionMatrix(self.num_labels, self.ignore_index).merge(self).merge(other)

    def __iadd__(self, other):
        return self.merge(other)

    def reset(self):
        self.matrix[...] = 0

    def compute(self, nan_to_num=None):
        """The scores of everything counted so far (see `metrics_from_confusion_matrix`)."""
        return metrics_from_confusion_matrix(self.matrix, nan_to_num=nan_to_num)


_DESCRIPTION = """
Mean intersection-over-union of predicted and reference label maps, from one confusion matrix over all images.
Also per-class IoU, per-class accuracy (recall) and overall pixel accuracy. Classes absent from both predictions
and references get NaN and are skipped by the means.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps, each (height, width) of integer class indices.
    references (`List[ndarray]`): reference label maps, each the shape of its prediction.
    num_labels (`int`): number of classes, background included.
    ignore_index (`int`, defaults to 255): reference value of pixels left out; as a prediction it is a miss.
    nan_to_num (`float`, *optional*): value that replaces NaN in the per-class arrays (the means still skip them).
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`, `per_category_accuracy`
    (arrays of length num_labels).
Example:
    >>> import numpy as np, evaluate, weaktr_hf.metrics
    >>> metric = evaluate.load(weaktr_hf.metrics.METRIC_PATH)
    >>> metric.compute(predictions=[np.array([[0, 1]])], references=[np.array([[0, 0]])], num_labels=2)["mean_iou"]
    0.25
"""

if evaluate is not None:

    class MeanIoU(evaluate.Metric):
        """`evaluate` wrapper around `confusion_matrix` + `metrics_from_confusion_matrix`."""

        def _info(self):
            label_map = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation="",
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features({"predictions": label_map, "references": label_map}),
            )

        def _compute(self, predictions, references, num_labels, ignore_index=DEFAULT_IGNORE_INDEX, nan_to_num=None):
            if len(predictions) != len(references):
                raise ValueError(f"got {len(predictions)} predictions for {len(references)} references.")
            accumulator = ConfusionMatrix(num_labels, ignore_index)
            for prediction, reference in zip(predictions, references):
                accumulator.update(prediction, reference)
            return accumulator.compute(nan_to_num=nan_to_num)
