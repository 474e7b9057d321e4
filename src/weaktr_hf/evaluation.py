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
from .inference import cams_to_labels, generate_cams, segment
from .metrics import ConfusionMatrix
from .pseudo_labels import _default_image_transform, _uint8_image


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
):
    """
    Score thresholded CAMs of a `WeakTrForCAM` against the dataset's masks (background included in the mIoU).

    Returns `{cam: {"mean_iou": best, "threshold": best_threshold, "per_threshold": {t: miou}}}` for each name in
    `cams` (`"coarse_cam"`, `"fine_cam"`, `"cross_attention"`).
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
        best = int(np.nanargmax(scores))
        results[cam] = {
            "mean_iou": float(scores[best]),
            "threshold": float(thresholds[best]),
            "per_threshold": {float(t): float(s) for t, s in zip(thresholds, scores)},
        }
    return results


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
):
    """
    Score a `WeakTrForSemanticSegmentation` on the dataset's masks: softmax probabilities from `segment` (sliding
    window, `scales`, `flip`), optionally refined by the dense CRF (`crf`: keyword arguments of
    `weaktr_hf.crf.crf_refine_probs`), then argmax.

    Returns the metric dict of `ConfusionMatrix.compute()` (`mean_iou`, `per_category_iou`, `overall_accuracy`, ...).
    `on_prediction(index, example, prediction)` is called for each scored sample (e.g. to save a few PNGs).
    """
    transform = image_transform or _default_image_transform()
    matrix = ConfusionMatrix(model.config.num_labels)
    device = next(model.parameters()).device
    indices = _shard(dataset, accelerator, max_samples)
    main = accelerator is None or accelerator.is_local_main_process
    for index in tqdm(indices, desc="segmentation mIoU", disable=not (show_progress and main)):
        example = dataset[index]
        reference = _reference(example)
        pixel_values = transform(example["image"]).unsqueeze(0).to(device)
        probabilities = segment(model, pixel_values, window_size, window_stride, scales=scales, flip=flip)[0]
        if crf is not None:
            from .crf import crf_refine_probs

            probabilities = torch.from_numpy(
                crf_refine_probs(_uint8_image(example["image"]), probabilities.float().cpu().numpy(), **crf)
            )
        prediction = probabilities.argmax(0).cpu().numpy()
        matrix.update(prediction, reference)
        if on_prediction is not None:
            on_prediction(index, example, prediction)
    return _sum_across_processes([matrix], accelerator)[0].compute()


__all__ = ["evaluate_cams", "evaluate_segmentation"]
