"""Choices of the recipe that need no pixel labels: the step-1 epoch, the pseudo-label CAM and the background threshold.

With ground-truth masks the recipe picks these on a train subset by mIoU (`weaktr_hf.evaluation.evaluate_cams`).
Without masks it uses the rules below, measured against the mask-based choice in `benchmarks/mask_free_selection.py`
(README, "Train on your own images").

- Epoch: the lowest multi-label classification loss of the class-token logits on held-out images
  (`heldout_classification_loss`): image-level labels are all it needs.
- Background threshold (`choose_cam_without_masks`): Otsu's rule on the CAMs themselves. For each image the
  foreground score of a pixel is its largest present-class CAM (the maps are min-max normalised per class, as for the
  pseudo-labels), and Otsu's threshold splits that image's scores into the two groups of least within-group variance.
  A CAM's threshold is the median of its images' Otsu thresholds.
- CAM (`choose_cam_without_masks`): the one whose passes agree most. The pseudo-labels average CAMs over several
  passes (scales, flips); each pass alone, thresholded at the image's Otsu threshold, gives a foreground mask, and a
  CAM that follows the objects rather than the patch grid or the background texture gives nearly the same mask in
  every pass. Agreement is the mean intersection-over-union of the foreground masks of every pair of passes (the
  scales of the pseudo-labels, each with and without a horizontal flip), averaged over the images.

The rule was designed on one demo-sized model (built-in synthetic set, seed 42) and then measured on others
(`benchmarks/mask_free_selection.py`; README, "Train on your own images"). A first version snapped the threshold to
the nearest value of the recipe's threshold sweep; that coarse grid cost up to 2.3 mIoU points in the measurement, so
the threshold is now Otsu's own.
"""

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .inference import generate_cams

OTSU_RULE = "otsu_threshold_pass_agreement"
CLASSIFICATION_RULE = "heldout_classification_loss"
OTSU_BINS = 64


def otsu_threshold(values, bins=OTSU_BINS):
    """Otsu's threshold of values in [0, 1] and its separability (between-group / total variance, 0 if constant).

    Returns `(threshold, separability)`: values above `threshold` form the upper group.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    histogram, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    probability = histogram / max(histogram.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(probability)
    mean_low_sum = np.cumsum(probability * centres)
    total_mean = mean_low_sum[-1]
    total_variance = float((probability * (centres - total_mean) ** 2).sum())
    weight_high = 1.0 - weight_low
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight_low - mean_low_sum) ** 2 / (weight_low * weight_high)
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    if total_variance <= 0 or not between.size:
        return 0.5, 0.0
    best = int(np.argmax(between))
    return float(edges[best + 1]), float(between[best] / total_variance)


def choose_cam_without_masks(
    model,
    dataset,
    cams=("coarse_cam", "fine_cam", "cross_attention"),
    scales=(1.0,),
    flip=False,
    image_transform=None,
    max_samples=None,
    show_progress=True,
):
    """
    Pick the pseudo-label CAM and background threshold of a `WeakTrForCAM` without masks (Otsu's rule, module
    docstring), from the images and image-level labels of `dataset` (the project schema).

    Images with no present class (background only) carry no CAM and are left out.

    Returns:
        `{"rule": "otsu_threshold_pass_agreement", "cam": name, "threshold": t, "per_cam": {name: {"threshold",
        "pass_agreement"}}, "num_images": n}`.
    """
    from .pseudo_labels import _default_image_transform

    transform = image_transform or _default_image_transform()
    device = next(model.parameters()).device
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    samples = dataset.select_columns(["image", "labels"])
    per_image = {cam: [] for cam in cams}
    for index in tqdm(range(count), desc="mask-free CAM choice", disable=not show_progress):
        example = samples[index]
        present = sorted(set(example["labels"]))
        if not present:
            continue
        pixel_values = transform(example["image"]).unsqueeze(0).to(device)
        labels = [present]
        maps = generate_cams(model, pixel_values, labels, scales=scales, flip=flip, cam=tuple(cams))
        passes = []  # each scale alone, with and without the flip, flipped back
        for scale in scales:
            for flipped in (False, True):
                one = generate_cams(model, pixel_values.flip(-1) if flipped else pixel_values, labels,
                                    scales=(scale,), flip=False, cam=tuple(cams))  # fmt: skip
                passes.append({cam: (one[cam].flip(-1) if flipped else one[cam])[0, present].amax(0) for cam in cams})
        for cam in cams:
            threshold, _ = otsu_threshold(maps[cam][0, present].amax(dim=0).float().cpu().numpy())
            masks = [one[cam] > threshold for one in passes]
            ious = [float((a & b).sum() / (a | b).sum().clamp_min(1)) for a, b in itertools.combinations(masks, 2)]
            per_image[cam].append((threshold, float(np.mean(ious))))
    if not any(per_image.values()):
        raise ValueError(
            "no image of the subset has an image-level label, so there is no CAM to choose a threshold from; "
            "give the pseudo-label threshold and CAM explicitly (train.py --cam_threshold and --pseudo_label_cam)."
        )
    per_cam = {}
    for cam, found in per_image.items():
        per_cam[cam] = {
            "threshold": float(np.median([threshold for threshold, _ in found])),
            "pass_agreement": float(np.mean([agreement for _, agreement in found])),
        }
    cam = max(cams, key=lambda name: per_cam[name]["pass_agreement"])
    return {
        "rule": OTSU_RULE,
        "cam": cam,
        "threshold": per_cam[cam]["threshold"],
        "per_cam": per_cam,
        "num_images": len(per_image[cam]),
    }


def heldout_classification_loss(model, dataset, image_size, max_samples=None, batch_size=32, image_transform=None):
    """
    Mean multi-label soft-margin loss of a `WeakTrForCAM`'s class-token logits on `dataset` (the project schema),
    images resized to `image_size`: the mask-free criterion for keeping the best step-1 epoch (lower is better).
    Background-only images (no label) count too: every class should score low on them.
    """
    from .image_processing_weaktr import WeakTrImageProcessor

    processor = WeakTrImageProcessor(size={"height": image_size, "width": image_size}, do_pad=False)
    device = next(model.parameters()).device
    num_labels = model.config.num_labels
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    samples = dataset.select_columns(["image", "labels"])
    total, seen = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, count, batch_size):
                batch = samples[start : min(start + batch_size, count)]
                pixel_values = processor(batch["image"], return_tensors="pt").pixel_values.to(device)
                targets = torch.zeros(len(batch["labels"]), num_labels, device=device)
                for row, labels in enumerate(batch["labels"]):
                    targets[row, list(labels)] = 1.0
                logits = model(pixel_values=pixel_values).logits.float()
                total += F.multilabel_soft_margin_loss(logits, targets, reduction="sum").item()
                seen += len(batch["labels"])
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("the held-out split is empty; it needs images to score the step-1 epochs.")
    return total / seen


def mask_selection_record(epoch, scores, cam):
    """The record of a mask-based step-1 choice (`cam_selection.json`): the epoch, the chosen CAM with its threshold,
    mIoU and sweep, and every scored CAM's own threshold under `per_cam`, so that a pseudo-label run asking for
    another of them gets the threshold swept for it (`threshold_for_cam`).

    Args:
        scores: `weaktr_hf.evaluation.evaluate_cams`'s result, `{cam: {"mean_iou", "threshold", "per_threshold"}}`.
        cam: the chosen name, one of `scores`.
    """
    if cam not in scores:
        raise ValueError(f"the chosen CAM {cam!r} was not scored; scored: {sorted(scores)}.")
    return {
        "epoch": epoch,
        "cam": cam,
        "threshold": scores[cam]["threshold"],
        "miou": scores[cam]["mean_iou"],
        "per_threshold": scores[cam]["per_threshold"],
        "per_cam": {name: {"threshold": v["threshold"], "miou": v["mean_iou"]} for name, v in scores.items()},
    }


def threshold_for_cam(selection, cam, source="the CAM selection record"):
    """The background threshold chosen for `cam` in a step-1 selection record (`cam_selection.json`), never another
    CAM's: from its `per_cam` entry, or, in a record without `per_cam`, the top-level threshold if `cam` is the
    chosen CAM. A CAM without a threshold of its own is an error that names the CAMs that have one (`source`, e.g.
    the file's path, says where the record came from)."""
    per_cam = selection.get("per_cam") or ({selection["cam"]: selection} if "cam" in selection else {})
    if cam in per_cam and "threshold" in per_cam[cam]:
        return float(per_cam[cam]["threshold"])
    raise ValueError(
        f"{source} holds no threshold chosen for {cam!r}, only for {sorted(per_cam)}; another CAM's threshold does "
        f"not fit it. Give the threshold (train.py --cam_threshold), or pick {cam!r} among the candidates of the "
        "cam stage (--pseudo_label_cam auto or that name) and rerun it."
    )


__all__ = [
    "CLASSIFICATION_RULE",
    "OTSU_RULE",
    "choose_cam_without_masks",
    "heldout_classification_loss",
    "mask_selection_record",
    "otsu_threshold",
    "threshold_for_cam",
]
