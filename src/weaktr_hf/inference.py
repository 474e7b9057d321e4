"""Full-resolution inference of both WeakTr models.

- `segment`: step-2 prediction (hustvl/WeakTr `OnlineRetraining/segm/model/utils.py` `inference`): sliding windows,
  multi-scale and flip, softmax probabilities averaged at the input size.
- `generate_cams`: step-1 CAM generation (paper Sec. 3.1; hustvl/WeakTr `engine.py` `generate_attention_maps_ms`):
  fine CAMs summed over scales and flips, absent classes zeroed, each present class min-max normalised.
- `cams_to_labels`: the pseudo-label map (background score = threshold, argmax; hustvl/WeakTr `evaluation.py`).

The per-class normalisation and the thresholded argmax are written once, in `image_processing_weaktr`
(`normalize_cams`, `cams_to_label_map`), and shared with `WeakTrImageProcessor.post_process_cams`.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .image_processing_weaktr import (
    CAM_OUTPUT_NAMES,
    WeakTrImageProcessor,
    cams_to_label_map,
    normalize_cams,
    segment_pass_size,
    window_starts as _window_starts,
)
from .modeling_weaktr import upsample_logits


@contextmanager
def _eval_mode(model):
    """Run the block with `model` in eval mode and without gradients, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model):
    return next(model.parameters()).device


def _check_pixel_values(pixel_values):
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if hasattr(pixel_values, "shape") else type(pixel_values).__name__
        raise ValueError(
            f"pixel_values must be a normalised image tensor of shape (batch_size, 3, height, width), got {shape}; "
            "build it with WeakTrImageProcessor."
        )


def _check_scales(scales):
    scales = tuple(float(scale) for scale in scales)
    if not scales or any(not math.isfinite(scale) or scale <= 0 for scale in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, e.g. (1.0, 1.2); got {scales}.")
    return scales


def _sliding_window_logits(model, pixel_values, window_size, window_stride, batch_size, aux=False):
    """Logits (B, num_labels, H, W) at pixel resolution, averaged over the windows covering each pixel.

    Windows are `window_size` squares, clipped to the image on a side shorter than the window (the model pads what
    is not a multiple of its patch size). Like the authors' sliding-window inference, logits (not probabilities)
    are averaged where windows overlap. With `aux`, returns `(logits, aux_logits)`, the second decoded before the
    last decoder block (`output_aux_logits`).
    """
    batch, _, height, width = pixel_values.shape
    crop = (min(window_size, height), min(window_size, width))
    anchors = [
        (top, left)
        for top in _window_starts(height, window_size, window_stride)
        for left in _window_starts(width, window_size, window_stride)
    ]
    # One crop per (window, image), processed `batch_size` at a time.
    jobs = [(top, left, index) for top, left in anchors for index in range(batch)]
    patch_size = model.config.patch_size
    merged = None
    count = torch.zeros(1, 1, height, width, device=pixel_values.device)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        crops = torch.stack(
            [pixel_values[index, :, top : top + crop[0], left : left + crop[1]] for top, left, index in chunk]
        )
        # The heads raw (the ensemble, if any, is taken after merging windows and passes).
        outputs = model(pixel_values=crops, output_aux_logits=aux, use_auxiliary_ensemble=False)
        heads = (outputs.logits, outputs.aux_logits) if aux else (outputs.logits,)
        heads = [upsample_logits(head.float(), crop, patch_size) for head in heads]
        if merged is None:
            merged = [head.new_zeros(batch, head.shape[1], height, width) for head in heads]
        for total, head in zip(merged, heads):
            for (top, left, index), window_logits in zip(chunk, head):
                total[index, :, top : top + crop[0], left : left + crop[1]] += window_logits
    for top, left in anchors:
        count[..., top : top + crop[0], left : left + crop[1]] += 1
    merged = [total / count for total in merged]
    return tuple(merged) if aux else merged[0]


def segment(
    model,
    pixel_values,
    window_size=480,
    window_stride=320,
    scales=(1.0,),
    flip=False,
    batch_size=4,
    base_size=None,
    min_size=None,
    aux_weight=None,
):
    """
    Class probabilities of a [`WeakTrForSemanticSegmentation`] at the input size, for full-resolution evaluation.

    For each scale the input is resized bilinearly (`segment_pass_size`: `round(H * scale), round(W * scale)`, or
    with `base_size` / `min_size` the authors' evaluation geometry) and covered by `window_size` windows every
    `window_stride` pixels (the last window flush with the border; a side shorter than the window is taken whole).
    Window logits are upsampled to pixels (`upsample_logits`) and averaged where windows overlap, resized back to
    (H, W) bilinearly and turned into softmax probabilities; with `flip` each scale is also run on the mirrored input
    (mirrored back). The probabilities of all passes are averaged.

    Args:
        model: a `WeakTrForSemanticSegmentation`; run in eval mode without gradients, its mode restored afterwards.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): normalised images, any size.
        window_size, window_stride (`int`): sliding window side and step in pixels (480 / 320 in the paper).
        scales (`tuple[float]`): resize factors of the passes.
        flip (`bool`): also run every scale on the horizontally flipped input.
        batch_size (`int`): window crops per forward pass.
        base_size (`int`, *optional*): resize the short side to `base_size` x scale first (the authors' 520).
        min_size (`int`, *optional*): upsample passes whose short side is below it (the authors' 480).
        aux_weight (`float`, *optional*): the authors' decoder ensemble (`--backbone multi --weight 0.8`): each
            pass gives `aux_weight` x P(decoded before the last decoder block) + P(final); divided by
            `1 + aux_weight` here so the result still sums to 1 (same argmax). Default: the model's
            `config.auxiliary_ensemble_weight`; 0 gives the final output alone.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`: probabilities summing to 1 per pixel,
        on the model's device. `argmax(dim=1)` gives the label map (0 = background).
    """
    if aux_weight is None:
        aux_weight = getattr(model.config, "auxiliary_ensemble_weight", 0.0)
    if not aux_weight >= 0:
        raise ValueError(f"aux_weight must be a number >= 0, got {aux_weight!r}.")
    final, aux = _segment_heads(model, pixel_values, window_size, window_stride, scales, flip, batch_size, base_size,
                                min_size, aux=aux_weight > 0)  # fmt: skip
    return final if aux is None else (final + aux_weight * aux) / (1.0 + aux_weight)


def _segment_heads(model, pixel_values, window_size, window_stride, scales, flip, batch_size, base_size, min_size,
                   aux=False):  # fmt: skip
    """`segment`'s passes: the final head's probabilities averaged over passes, and with `aux` those decoded before
    the last decoder block (else None)."""
    _check_pixel_values(pixel_values)
    scales = _check_scales(scales)
    for name, value in (("window_size", window_size), ("window_stride", window_stride), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("base_size", base_size), ("min_size", min_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}.")
    if window_stride > window_size:
        raise ValueError(
            f"window_stride ({window_stride}) is larger than window_size ({window_size}), which would leave pixels "
            "that no window covers; use a stride at most the window size."
        )
    height, width = pixel_values.shape[-2:]
    totals = [None, None] if aux else [None]
    num_passes = 0
    with _eval_mode(model):
        pixel_values = pixel_values.to(_model_device(model))
        for scale in scales:
            scaled = pixel_values
            for size in segment_pass_size((height, width), scale, base_size, min_size):
                if size is not None and size != tuple(scaled.shape[-2:]):
                    scaled = F.interpolate(scaled.float(), size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                inputs = scaled.flip(-1) if flipped else scaled
                heads = _sliding_window_logits(model, inputs, window_size, window_stride, batch_size, aux=aux)
                for index, logits in enumerate(heads if aux else (heads,)):
                    if flipped:
                        logits = logits.flip(-1)
                    if logits.shape[-2:] != (height, width):
                        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                    probabilities = logits.softmax(dim=1)
                    totals[index] = probabilities if totals[index] is None else totals[index] + probabilities
                num_passes += 1
    means = [total / num_passes for total in totals]
    return means[0], (means[1] if aux else None)


def _present_classes(labels, batch_size, num_classes, device):
    """Image-level labels (multi-hot (B, C) or lists of class ids) as a boolean (B, C) tensor on `device`."""
    return WeakTrImageProcessor._present_classes(labels, batch_size, num_classes).to(device)


def scaled_input_size(size, scale, patch_size):
    """(height, width) of the pass at `scale` for CAM generation: each side `round(side * scale)`, then rounded to the
    nearest multiple of `patch_size` (halves up, at least one patch), since `WeakTrForCAM` takes whole patches only.

    The authors instead let the patch convolution drop the last `side % patch_size` pixels; resizing to a whole
    number of patches keeps the CAM aligned with the whole image instead.
    """
    return tuple(max(1, math.floor(round(side * scale) / patch_size + 0.5)) * patch_size for side in size)


def generate_cams(model, pixel_values, labels, scales=(1.0, 1.2), flip=True, cam="fine_cam"):
    """
    Multi-scale, flipped CAMs of a [`WeakTrForCAM`] at the input size, min-max normalised per present class
    (paper Sec. 3.1; hustvl/WeakTr `engine.py` `generate_attention_maps_ms`).

    For each scale the input is resized (bicubic, antialiased, like the authors' image resize) to
    `scaled_input_size(...)`, a whole number of patches; each pass is also run on the flipped input and its map
    flipped back. Each pass's map (`cam`, ReLU'd) is upsampled bilinearly to (H, W), absent classes are zeroed, the
    passes are summed, and each present class is min-max normalised to [0, 1] (`normalize_cams`).

    Args:
        model: a `WeakTrForCAM`; run in eval mode without gradients, its mode restored afterwards.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): normalised images at their native
            size (a batch must share one size; usually one image).
        labels: image-level labels, multi-hot `(batch_size, num_labels)` or one list of class ids per image.
        scales (`tuple[float]`): 1.0 / 1.2 for VOC, 1.0 / 0.8 / 1.2 for COCO in the paper.
        flip (`bool`): add the horizontally flipped pass of every scale.
        cam (`str` or `tuple[str]`): the output field to use: `"fine_cam"` (the paper's), `"coarse_cam"` or
            `"cross_attention"`; a tuple of them gives `{name: cams}` from the same forward passes.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, num_labels, height, width)` on the model's device (a dict of them
        for a tuple of names): values in [0, 1] for present classes, exactly 0 for absent ones.
    """
    _check_pixel_values(pixel_values)
    scales = _check_scales(scales)
    names = (cam,) if isinstance(cam, str) else tuple(cam)
    for name in names:
        if name not in CAM_OUTPUT_NAMES:
            raise ValueError(f"cam must be one of {CAM_OUTPUT_NAMES} (or a tuple of them), got {name!r}.")
    batch_size, _, height, width = pixel_values.shape
    device = _model_device(model)
    present = _present_classes(labels, batch_size, model.config.num_labels, device)
    keep = present[..., None, None].float()
    totals = dict.fromkeys(names)
    with _eval_mode(model):
        pixel_values = pixel_values.to(device)
        for scale in scales:
            size = scaled_input_size((height, width), scale, model.config.patch_size)
            scaled = pixel_values
            if size != (height, width):
                scaled = F.interpolate(
                    pixel_values.float(), size=size, mode="bicubic", align_corners=False, antialias=True
                )
            for flipped in (False, True) if flip else (False,):
                outputs = model(pixel_values=scaled.flip(-1) if flipped else scaled)
                for name in names:  # one forward pass serves every requested CAM
                    maps = getattr(outputs, name).float().relu()
                    if flipped:
                        maps = maps.flip(-1)
                    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False) * keep
                    totals[name] = maps if totals[name] is None else totals[name] + maps
    cams = {name: normalize_cams(total, present) for name, total in totals.items()}
    return cams[cam] if isinstance(cam, str) else cams


def cams_to_labels(cams, labels, threshold):
    """
    Pseudo-label maps from normalised CAMs (hustvl/WeakTr `evaluation.py`): background scores `threshold`, each present
    class its CAM, argmax per pixel; absent classes never win.

    Args:
        cams (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`): e.g. from `generate_cams`.
        labels: multi-hot `(batch_size, num_labels)` or one list of class ids per image.
        threshold (`float`): background score (0.43 VOC, 0.42 COCO in the paper).

    Returns:
        `torch.LongTensor` of shape `(batch_size, height, width)`: 0 = background, k + 1 = foreground class k.
    """
    if not isinstance(cams, torch.Tensor) or cams.ndim != 4:
        shape = tuple(cams.shape) if hasattr(cams, "shape") else type(cams).__name__
        raise ValueError(f"cams must be a (batch_size, num_labels, height, width) tensor, got {shape}.")
    present = _present_classes(labels, cams.shape[0], cams.shape[1], cams.device)
    return cams_to_label_map(cams, present, float(threshold)).to(torch.int64)


__all__ = ["cams_to_labels", "generate_cams", "scaled_input_size", "segment", "segment_pass_size"]
