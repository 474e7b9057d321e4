"""Evaluation of both WeakTr steps on a dataset in the project schema, sharded across processes.

- `evaluate_cams`: mIoU of thresholded CAMs (coarse, fine, cross-attention) against ground-truth masks, for one or
  several background thresholds (the authors pick the step-1 epoch and threshold this way on a train subset).
- `evaluate_segmentation`: mIoU of a step-2 model's predictions (sliding window, multi-scale, flip, optional CRF).

Each process scores the samples `index % num_processes == process_index`; confusion matrices are summed across
processes, so every sample counts exactly once.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.schema import mask_to_array
from .image_processing_weaktr import pil_image_to_uint8
from .inference import _segment_heads, cams_to_labels, generate_cams
from .metrics import ConfusionMatrix
from .pseudo_labels import _default_image_transform


def _shard(dataset, accelerator, max_samples=None):
    indices = range(len(dataset) if max_samples is None else min(max_samples, len(dataset)))
    if accelerator is None:
        return list(indices)
    return [i for i in indices if i % accelerator.num_processes == accelerator.process_index]


def _sum_across_processes(matrices, accelerator):
    """Sum the confusion matrices of every process (a no-op for a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return matrices
    stacked = torch.tensor(np.stack([m.matrix for m in matrices]), device=accelerator.device)
    total = accelerator.reduce(stacked, reduction="sum").cpu().numpy()
    for matrix, summed in zip(matrices, total):
        matrix.matrix = summed.astype(matrix.matrix.dtype)
    return matrices


def _reference(example):
    if example.get("semantic_mask") is None:
        raise ValueError(f"sample {example['id']!r} has no semantic_mask; evaluation needs ground-truth masks.")
    return mask_to_array(example["semantic_mask"], example["id"])


def _absent_classes(reference, num_labels, ignore_index=255):
    """The foreground classes a mask does not hold (the background is never absent)."""
    present = np.zeros(num_labels, dtype=bool)
    values = np.unique(reference)
    present[values[(values != ignore_index) & (values < num_labels)]] = True
    present[0] = True
    return torch.from_numpy(np.flatnonzero(~present))


def evaluate_cams(
    model,
    dataset,
    cams=("coarse_cam", "fine_cam"),
    thresholds=(0.43,),
    scales=(1.0,),
    flip=False,
    image_transform=None,
    accelerator=None,
    max_samples=None,
    show_progress=True,
    early_stop=False,
):
    """
    Score thresholded CAMs of a `WeakTrForCAM` against the dataset's masks (background included in the mIoU).

    Returns `{cam: {"mean_iou": best, "threshold": best_threshold, "per_threshold": {t: miou}}}` for each name in
    `cams` (`"coarse_cam"`, `"fine_cam"`, `"cross_attention"`). With `early_stop`, the best is taken as the authors'
    sweep does (hustvl/WeakTr evaluation.py:258-267): thresholds in the given order, stopping at the first one that
    does not improve on the previous best.
    """
    transform = image_transform or _default_image_transform()
    num_labels = model.config.num_labels + 1
    matrices = {cam: [ConfusionMatrix(num_labels) for _ in thresholds] for cam in cams}
    device = next(model.parameters()).device
    indices = _shard(dataset, accelerator, max_samples)
    main = accelerator is None or accelerator.is_local_main_process
    for index in tqdm(indices, desc="CAM mIoU", disable=not (show_progress and main)):
        example = dataset[index]
        reference = _reference(example)
        pixel_values = transform(example["image"]).unsqueeze(0).to(device)
        all_maps = generate_cams(model, pixel_values, [example["labels"]], scales=scales, flip=flip, cam=tuple(cams))
        for cam, maps in all_maps.items():
            for threshold, matrix in zip(thresholds, matrices[cam]):
                matrix.update(cams_to_labels(maps, [example["labels"]], threshold)[0].cpu().numpy(), reference)
    results = {}
    for cam in cams:
        scores = [m.compute()["mean_iou"] for m in _sum_across_processes(matrices[cam], accelerator)]
        if all(np.isnan(score) for score in scores):
            raise ValueError(
                f"no pixel was scored: the selection holds no sample (dataset of {len(dataset)}, max_samples="
                f"{max_samples}) or only ignored pixels, so there is no best threshold. Pass samples with masks."
            )
        best = _early_stopped_best(scores) if early_stop else int(np.nanargmax(scores))
        results[cam] = {
            "mean_iou": float(scores[best]),
            "threshold": float(thresholds[best]),
            "per_threshold": {float(t): float(s) for t, s in zip(thresholds, scores)},
        }
    return results


def _early_stopped_best(scores):
    """Index of the best score when sweeping in order and stopping at the first score that does not improve."""
    best, best_score = 0, -np.inf
    for index, score in enumerate(scores):
        if not score > best_score:
            break
        best, best_score = index, score
    return best


def evaluate_segmentation(
    model,
    dataset,
    window_size,
    window_stride,
    scales=(1.0,),
    flip=False,
    crf=None,
    image_transform=None,
    accelerator=None,
    max_samples=None,
    show_progress=True,
    on_prediction=None,
    base_size=None,
    min_size=None,
    aux_weight=0.0,
    skip_unlabelled=False,
    present_classes_only=False,
):
    """
    Score a `WeakTrForSemanticSegmentation` on the dataset's masks: softmax probabilities from `segment` (sliding
    window, `scales`, `flip`, `base_size`, `min_size`, `aux_weight`), then argmax.

    With `crf` (keyword arguments of `weaktr_hf.crf.crf_refine_probs`, e.g. `SEGMENTATION_CRF`) the prediction is
    also refined as the authors' evaluation does (`crf_refine_present_classes`: only the classes of the argmax map,
    on their unnormalised ensemble `aux_weight x P1 + P2`), and both scores are returned.

    Returns the metric dict of `ConfusionMatrix.compute()` (`mean_iou`, `per_category_iou`, `overall_accuracy`, ...)
    of the prediction, plus `num_scored`, the samples with a mask; with `crf` it also holds `"crf"`: the same dict
    for the CRF-refined prediction, and with `aux_weight > 0` `"final_only"`: the dict of the final decoder output
    alone (the same forward passes). `on_prediction(index, example, prediction)` is called for each predicted sample
    (e.g. to save PNGs) with the final (CRF-refined when `crf` is given) prediction. A sample without a mask is an
    error, or with `skip_unlabelled` predicted (and passed to `on_prediction`) but not scored; with no mask at all
    `mean_iou` is NaN.

    With `present_classes_only` each prediction is restricted to the background and the classes of the image's own
    mask (its image-level labels, which the pseudo-labels are made with): the score once the segmenter is told which
    classes an image holds, so that a gap to the pseudo-labels splits into telling the classes apart and finding
    them (`examples/diagnose_step2.py`). A diagnostic that reads the truth, never an evaluation of the segmenter.
    """
    transform = image_transform or _default_image_transform()
    names = ["main"] + (["crf"] if crf is not None else []) + (["final_only"] if aux_weight > 0 else [])
    matrices = {name: ConfusionMatrix(model.config.num_labels) for name in names}
    device = next(model.parameters()).device
    indices = _shard(dataset, accelerator, max_samples)
    main = accelerator is None or accelerator.is_local_main_process
    scored = 0
    for index in tqdm(indices, desc="segmentation mIoU", disable=not (show_progress and main)):
        example = dataset[index]
        reference = None if skip_unlabelled and example.get("semantic_mask") is None else _reference(example)
        pixel_values = transform(example["image"]).unsqueeze(0).to(device)
        final, aux = _segment_heads(model, pixel_values, window_size, window_stride, scales, flip, 4, base_size,
                                    min_size, aux=aux_weight > 0)  # fmt: skip
        if present_classes_only and reference is not None:
            absent = _absent_classes(reference, model.config.num_labels).to(final.device)
            final[:, absent] = -1.0
            if aux is not None:
                aux[:, absent] = -1.0
        probabilities = (final if aux is None else (final + aux_weight * aux) / (1.0 + aux_weight))[0]
        prediction = probabilities.argmax(0).cpu().numpy()
        if reference is not None:
            scored += 1
            matrices["main"].update(prediction, reference)
            if aux is not None:
                matrices["final_only"].update(final[0].argmax(0).cpu().numpy(), reference)
        if crf is not None:
            from .crf import crf_refine_present_classes

            # The authors' CRF sees aux_weight x P1 + P2 unnormalised (its unary clips probabilities at 1).
            ensemble = probabilities.float().cpu().numpy() * (1.0 + aux_weight)
            prediction = crf_refine_present_classes(pil_image_to_uint8(example["image"]), ensemble, **crf)
            if reference is not None:
                matrices["crf"].update(prediction, reference)
        if on_prediction is not None:
            on_prediction(index, example, prediction)
    summed = _sum_across_processes(list(matrices.values()), accelerator)
    results = {name: matrix.compute() for name, matrix in zip(names, summed)}
    main_result = results.pop("main")
    main_result.update(results)
    if accelerator is not None and accelerator.num_processes > 1:
        scored = int(accelerator.reduce(torch.tensor([scored], device=accelerator.device), reduction="sum").item())
    main_result["num_scored"] = scored
    return main_result


__all__ = ["evaluate_cams", "evaluate_segmentation"]
