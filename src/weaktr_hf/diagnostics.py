"""Diagnostics of WeakTr step 2: which classes the segmenter learns from its pseudo-labels, and why not.

- `class_fit_report`: per class, the segmenter's IoU against its own training pseudo-labels (fit) beside its IoU
  against the truth on validation, the pixel shares it predicts, and a warning for every class the pseudo-labels
  hold that the segmenter never predicts.
- `StepTwoProbe`: attached to a `WeakTrForSemanticSegmentation` during training (hooks only: the training is
  unchanged), it records per class and per update: the class's pixel share in the augmented crops and how often it
  covers less than one patch, the share of its pixels whose loss is clipped, the gradient reaching its logits, its
  mask embedding and the patch features of its patches, and the norm of its decoder class embedding.
- `patch_grid_miou`: the mIoU a label map keeps once it passes through the segmenter's patch grid (averaged per
  patch, upsampled as the logits are), e.g. what a segmenter that reproduced its pseudo-labels exactly could score.
"""

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation import evaluate_segmentation
from .metrics import ConfusionMatrix
from .modeling_weaktr import clip_pixel_losses, upsample_logits

logger = logging.getLogger(__name__)


def _class_names(model, class_names):
    num_labels = model.config.num_labels
    if class_names is None:
        return [str(model.config.id2label.get(index, index)) for index in range(num_labels)]
    if len(class_names) != num_labels:
        raise ValueError(
            f"class_names has {len(class_names)} names but the model has {num_labels} labels (background included); "
            "pass one name per label, background first, or None to use config.id2label."
        )
    return list(class_names)


def _scored_with_shares(model, dataset, num_labels, **kwargs):
    """`evaluate_segmentation` plus the share of predicted pixels of each class."""
    predicted = np.zeros(num_labels, dtype=np.int64)

    def count(index, example, prediction):
        predicted[:] += np.bincount(prediction.ravel().astype(np.int64), minlength=num_labels)[:num_labels]

    scores = evaluate_segmentation(model, dataset, on_prediction=count, show_progress=False, **kwargs)
    return scores, predicted / max(predicted.sum(), 1)


def _reference_shares(dataset, num_labels, max_samples, ignore_index=255):
    counts = np.zeros(num_labels, dtype=np.int64)
    masks = dataset.select_columns(["semantic_mask"])
    for index in range(len(dataset) if max_samples is None else min(max_samples, len(dataset))):
        mask = np.asarray(masks[index]["semantic_mask"], dtype=np.int64)
        counts += np.bincount(mask[mask != ignore_index].ravel(), minlength=num_labels)[:num_labels]
    return counts / max(counts.sum(), 1)


def class_fit_report(
    model,
    pseudo_label_train,
    val,
    window_size,
    window_stride,
    class_names=None,
    train_samples=200,
    val_samples=None,
    image_transform=None,
    scales=(1.0,),
    flip=False,
    never_predicted_share=0.0,
    log_warnings=True,
    **segment_kwargs,
):
    """
    Per class: the segmenter's fit to its training pseudo-labels beside its validation IoU, and the classes it drops.

    Args:
        model: a trained `WeakTrForSemanticSegmentation`.
        pseudo_label_train: the training split with its pseudo-labels in `semantic_mask` (`pseudo_label_dataset`).
        val: the validation split with ground-truth `semantic_mask`, or None to report the fit only.
        window_size, window_stride, scales, flip, image_transform, **segment_kwargs: as `evaluate_segmentation`
            (single scale by default: the fit is about what training taught, not about test-time ensembling).
        class_names: one name per label, background first (default: `config.id2label`).
        train_samples, val_samples: how many images of each split to score (None: all).
        never_predicted_share: a class whose share of the predicted training pixels is at most this counts as never
            predicted (0: not a single pixel).
        log_warnings: also log each warning on the `weaktr_hf.diagnostics` logger (off where the caller prints
            them itself, so that a run shows each once).

    Returns:
        dict with `classes` (one dict per label: `name`, `pseudo_label_share` and `fit_predicted_share` on the
        training images, `fit_iou`, and with `val` `val_iou`, `val_share`, `val_predicted_share`), `fit_miou`,
        `val_miou`, `never_predicted` (the names of the classes present in the pseudo-labels but never predicted on
        them) and `warnings` (one sentence per such class); each warning is also logged unless `log_warnings` is False.
    """
    num_labels = model.config.num_labels
    names = _class_names(model, class_names)
    common = dict(window_size=window_size, window_stride=window_stride, scales=scales, flip=flip,
                  image_transform=image_transform, **segment_kwargs)  # fmt: skip
    fit, fit_predicted = _scored_with_shares(model, pseudo_label_train, num_labels, max_samples=train_samples, **common)
    pseudo_share = _reference_shares(pseudo_label_train, num_labels, train_samples)
    report = {"fit_miou": fit["mean_iou"], "fit_samples": fit["num_scored"], "classes": [], "warnings": [],
              "never_predicted": []}  # fmt: skip
    if val is not None:
        scored, val_predicted = _scored_with_shares(model, val, num_labels, max_samples=val_samples, **common)
        val_share = _reference_shares(val, num_labels, val_samples)
        report.update(val_miou=scored["mean_iou"], val_samples=scored["num_scored"])
    for label in range(num_labels):
        row = {"name": names[label], "pseudo_label_share": float(pseudo_share[label]),
               "fit_predicted_share": float(fit_predicted[label]), "fit_iou": float(fit["per_category_iou"][label])}  # fmt: skip
        if val is not None:
            row.update(val_iou=float(scored["per_category_iou"][label]), val_share=float(val_share[label]),
                       val_predicted_share=float(val_predicted[label]))  # fmt: skip
        report["classes"].append(row)
        if pseudo_share[label] > 0 and fit_predicted[label] <= never_predicted_share:
            message = (
                f"class {names[label]!r} holds {100 * pseudo_share[label]:.1f}% of the training pseudo-label pixels "
                f"but the segmenter predicts it on {100 * fit_predicted[label]:.2f}% of them (fit IoU "
                f"{row['fit_iou']:.2f}): step 2 did not learn it. See docs/step2-diagnosis.md."
            )
            report["warnings"].append(message)
            report["never_predicted"].append(names[label])
            if log_warnings:
                logger.warning(message)
    return report


def dropped_classes(pseudo_label_iou, segmenter_iou, pseudo_label_min=0.2, segmenter_max=0.1):
    """The classes step 2 dropped: per-class IoU dicts (name -> IoU, None where unscored) of the pseudo-labels against
    the truth and of the segmenter on val; a class is dropped when its pseudo-labels reach `pseudo_label_min` but the
    segmenter stays under `segmenter_max`."""
    return [name for name, iou in pseudo_label_iou.items()
            if iou is not None and iou >= pseudo_label_min and (segmenter_iou.get(name) or 0.0) < segmenter_max]


def format_fit_report(report):
    """The `class_fit_report` as a Markdown table (percentages), its warnings below."""
    has_val = "val_miou" in report
    header = "| class | pseudo-label share | predicted share (train) | fit IoU |"
    header += " val IoU | val share | predicted share (val) |" if has_val else ""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["classes"]:
        cells = [row["name"], row["pseudo_label_share"], row["fit_predicted_share"], row["fit_iou"]]
        if has_val:
            cells += [row["val_iou"], row["val_share"], row["val_predicted_share"]]
        lines.append("| " + " | ".join(cells[:1] + [_percent(value) for value in cells[1:]]) + " |")
    means = f"fit mIoU {_percent(report['fit_miou'])} on {report['fit_samples']} training images"
    if has_val:
        means += f"; val mIoU {_percent(report['val_miou'])} on {report['val_samples']} images (single pass)"
    return "\n".join(lines + ["", means] + [f"WARNING: {warning}" for warning in report["warnings"]])


def _percent(value):
    return "nan" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _patch_labels(labels, patch_size, num_labels, ignore_index):
    """`(B, H, W)` pixel labels -> `(B, rows, cols)` majority label of each patch, -1 where ignored pixels dominate."""
    height, width = labels.shape[-2:]
    pad = (0, (-width) % patch_size, 0, (-height) % patch_size)
    labels = F.pad(labels, pad, value=ignore_index)
    labels = torch.where(labels == ignore_index, torch.full_like(labels, num_labels), labels)
    one_hot = F.one_hot(labels, num_labels + 1).permute(0, 3, 1, 2).float()
    majority = F.avg_pool2d(one_hot, patch_size).argmax(1)
    return torch.where(majority == num_labels, torch.full_like(majority, -1), majority)


def _through_patch_grid(label, patch_size, num_labels, scale, ignore_index):
    """`(H, W)` labels -> `(num_labels, H, W)` class shares after the patch grid at `scale`, as the logits would be."""
    height, width = label.shape
    size = (max(round(height * scale), 1), max(round(width * scale), 1))
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    valid = label != ignore_index
    one_hot = F.one_hot(torch.where(valid, label, 0), num_labels).permute(2, 0, 1).float() * valid
    pad = (0, (-size[1]) % patch_size, 0, (-size[0]) % patch_size)  # the model pads bottom / right
    shares = F.avg_pool2d(F.pad(one_hot, pad)[None], patch_size)
    shares = upsample_logits(shares, size, patch_size)
    return F.interpolate(shares, size=(height, width), mode="bilinear", align_corners=False)[0]


def patch_grid_miou(pairs, num_labels, patch_size, scales=(1.0,), ignore_index=255):
    """
    The mIoU a label map keeps through a segmenter's patch grid: an upper bound for a segmenter that reproduces it.

    Each label map is resized (nearest) to every scale, its one-hot classes are averaged over each `patch_size`
    patch (what one patch's logits can hold at best), upsampled bilinearly as `upsample_logits` does and resized
    back; the shares are summed over the scales (as the multi-scale evaluation sums probabilities) and the argmax
    is scored against the truth.

    Args:
        pairs (iterable of `(label, truth)`): `(H, W)` integer arrays; `label` may hold `ignore_index` (counted as
            no class), `truth` pixels at `ignore_index` are not scored.
        num_labels (`int`): classes, background included.
        patch_size (`int`): the segmenter's patch size (`model.config.patch_size`).
        scales (`tuple[float]`): the evaluation's scales; `(1.0,)` for a single pass.

    Returns:
        The dict of `ConfusionMatrix.compute()` (`mean_iou`, `per_category_iou`, ...).
    """
    if patch_size < 1 or not scales or min(scales) <= 0:
        raise ValueError(f"patch_size must be >= 1 and scales positive, got {patch_size} and {scales}.")
    matrix = ConfusionMatrix(num_labels, ignore_index=ignore_index)
    for label, truth in pairs:
        label = torch.as_tensor(np.asarray(label, dtype=np.int64))
        truth = np.asarray(truth, dtype=np.int64)
        if label.shape != truth.shape:
            raise ValueError(f"a label map of shape {tuple(label.shape)} has a truth of shape {truth.shape}.")
        if ((label != ignore_index) & ((label < 0) | (label >= num_labels))).any():
            raise ValueError(f"a label map holds values outside 0..{num_labels - 1} and {ignore_index}.")
        shares = sum(_through_patch_grid(label, patch_size, num_labels, scale, ignore_index) for scale in scales)
        matrix.update(shares.argmax(0).numpy(), truth)
    return matrix.compute()


class StepTwoProbe:
    """
    Per-class measurements of step-2 training, recorded by hooks on a `WeakTrForSemanticSegmentation`.

    `attach(model)` before training and `detach()` after; the hooks read tensors and gradients and change nothing
    (the same updates, the same random draws). Every training forward with `labels` records one row per update;
    `rows` holds them and `summary(steps_per_epoch)` averages them per epoch. Per class `c`, a row holds:

    - `share`: c's share of the non-ignored pixels of the augmented crops (what the loss sees);
    - `present`, `small`: crops holding c, and those where c covers less than one patch (`patch_size`^2 pixels);
    - `clipped`: the share of c's pixels whose loss was capped (no gradient) by gradient clipping;
    - `loss`: c's mean pixel loss, `predicted`: c's share of the predicted (argmax) crop pixels;
    - `logit_grad`: norm of the loss gradient on c's logit map; `embedding_grad`: on c's class token at the decoder
      head (what becomes its mask embedding); `patch_grad`: mean norm of the gradient on the head's patch features
      of the patches whose majority label is c;
    - `embedding_norm`: norm of c's mask embedding (class token after the head projection, batch mean),
      `embedding_cosine`: its largest cosine similarity with another class's, `token_norm`: norm of c's learned
      decoder token (`cls_emb`); `mask_norm_weight`, `mask_norm_bias`: c's scale and offset in the class LayerNorm.
    """

    def __init__(self):
        self.rows = []
        self._handles = []
        self._row = None

    def attach(self, model):
        self.model = model
        config = model.config
        self.num_labels, self.patch_size = config.num_labels, config.patch_size
        self.ignore_index = config.semantic_loss_ignore_index
        decoder = model.decoder
        self._handles = [
            model.register_forward_pre_hook(self._on_model_input, with_kwargs=True),
            decoder.decoder_norm.register_forward_hook(self._on_head_input),
            model.register_forward_hook(self._on_model_output, with_kwargs=True),
        ]
        return self

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_model_input(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if not module.training or labels is None:
            self._row = None
            return
        self._labels = labels.detach()
        self._row = {}
        self.rows.append(self._row)

    def _on_head_input(self, module, args, output):
        if self._row is None or not output.requires_grad:
            return
        row, num_labels, decoder = self._row, self.num_labels, self.model.decoder
        with torch.no_grad():
            embeddings = output[:, -num_labels:] @ decoder.proj_classes
            row["embedding_norm"] = embeddings.norm(dim=-1).mean(0)
            unit = F.normalize(embeddings, dim=-1)
            cosine = unit @ unit.transpose(1, 2)
            cosine = cosine - 3 * torch.eye(num_labels, device=cosine.device)
            row["embedding_cosine"] = cosine.amax(-1).mean(0)
            row["token_norm"] = decoder.cls_emb[0].norm(dim=-1)
            row["mask_norm_weight"] = decoder.mask_norm.weight.detach().clone()
            row["mask_norm_bias"] = decoder.mask_norm.bias.detach().clone()
        labels = self._labels

        def on_grad(grad, row=row):
            row["embedding_grad"] = grad[:, -num_labels:].norm(dim=-1).pow(2).sum(0).sqrt()
            patch_norms = grad[:, :-num_labels].norm(dim=-1)
            majority = _patch_labels(labels, self.patch_size, num_labels, self.ignore_index).flatten(1)
            if majority.shape[1] != patch_norms.shape[1]:  # not a square grid: leave the patch gradient out
                return
            sums = torch.zeros(num_labels).index_add_(0, majority[majority >= 0], patch_norms[majority >= 0])
            counts = torch.bincount(majority[majority >= 0], minlength=num_labels)[:num_labels]
            row["patch_grad"] = sums / counts.clamp_min(1)

        output.register_hook(on_grad)

    def _on_model_output(self, module, args, kwargs, output):
        if self._row is None:
            return
        row, num_labels, labels, config = self._row, self.num_labels, self._labels, module.config
        logits = output["logits"]
        if logits.requires_grad:
            logits.register_hook(lambda grad: row.__setitem__("logit_grad", grad.pow(2).sum((0, 2, 3)).sqrt()))
        with torch.no_grad():
            pixel_logits = upsample_logits(logits.detach().float(), labels.shape[-2:], self.patch_size)
            losses = F.cross_entropy(pixel_logits, labels, ignore_index=self.ignore_index, reduction="none")
            valid = labels != self.ignore_index
            if config.use_gradient_clipping:
                capped = clip_pixel_losses(losses, valid, config.clip_start_value, config.clip_window_size,
                                           config.loss_average)  # fmt: skip
                clipped = capped < losses
            else:
                clipped = torch.zeros_like(valid)
            flat = torch.where(valid, labels, torch.full_like(labels, num_labels))
            counts = torch.bincount(flat.flatten(), minlength=num_labels + 1)[:num_labels]
            row["pixels"] = counts
            row["share"] = counts / counts.sum().clamp_min(1)
            row["clipped"] = torch.bincount(flat[clipped], minlength=num_labels + 1)[:num_labels] / counts.clamp_min(1)
            row["loss"] = torch.zeros(num_labels + 1).index_add_(0, flat.flatten(), losses.flatten())[
                :num_labels
            ] / counts.clamp_min(1)
            predicted = pixel_logits.argmax(1)[valid]
            row["predicted"] = torch.bincount(predicted, minlength=num_labels)[:num_labels] / max(predicted.numel(), 1)
            per_crop = torch.stack([torch.bincount(crop.flatten(), minlength=num_labels + 1)[:num_labels]
                                    for crop in flat])  # fmt: skip
            row["present"] = (per_crop > 0).sum(0)
            row["small"] = ((per_crop > 0) & (per_crop < self.patch_size**2)).sum(0)
            row["clipping_on"] = torch.tensor(float(bool(clipped.any())))
        self._row = None

    def summary(self, steps_per_epoch):
        """Per epoch, the mean of every measurement over its updates (as lists), and the totals `present` / `small`.

        A measurement missing from a row (e.g. a gradient of a forward without backward) is left out of its mean.
        """
        epochs = []
        for start in range(0, len(self.rows), steps_per_epoch):
            rows = self.rows[start : start + steps_per_epoch]
            epoch = {"epoch": len(epochs), "updates": len(rows)}
            keys = sorted({key for row in rows for key in row})
            for key in keys:
                values = torch.stack([torch.as_tensor(row[key], dtype=torch.float64) for row in rows if key in row])
                epoch[key] = (values.sum(0) if key in ("present", "small", "pixels") else values.mean(0)).tolist()
            epochs.append(epoch)
        return epochs


__all__ = ["StepTwoProbe", "class_fit_report", "format_fit_report", "patch_grid_miou"]
