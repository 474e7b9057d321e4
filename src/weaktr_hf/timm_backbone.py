"""Pretrained initialisation of WeakTr's encoder from timm ViT / DeiT / DINOv2 / EVA-02 weights.

Kept apart from the models (like timm's `checkpoint_filter_fn`) so the modeling file stays a forward pass. The
encoder uses timm's parameter names, so the mapping is mostly one to one; what differs is the number of prefix
tokens (C class tokens in step 1), the patch grid, and for the authors' step-2 backbones the patch size: DINOv2 and
EVA-02 were pretrained on 14-px patches, which the authors resize to 16 px (OnlineRetraining/segm/model/utils.py
`checkpoint_filter_fn`).
"""

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .modeling_weaktr import WeakTrModel, resize_position_embeddings

logger = logging.getLogger(__name__)

# timm keys that no WeakTr encoder uses: classifier heads, distillation token, pooled-feature norm; the masked-image-
# modelling parts of the official DINOv2 / EVA-02 files (mask token, EVA's `lm_head`).
UNUSED_TIMM_PREFIXES = ("head.", "head_dist.", "dist_token", "fc_norm.", "pre_logits.", "mask_token", "lm_head.")

# The pretrained weights the authors' step-2 encoders start from besides DeiT-S, by timm name (OR =
# OnlineRetraining/segm/): backbone names and statistics in OR/config.yml, loading in OR/model/factory.py. The variant
# is read from the keys; what cannot be is listed here: how step 2 resized the position table (DeiT-S: bilinear, the
# step-2 default, OR/model/utils.py:22-40, 55). The recipes' image statistics are in examples/train.py's presets.
PRETRAINED_BACKBONES = {
    # vit_small_patch16_384: the augreg ImageNet-21k weights fine-tuned on ImageNet-1k, loaded from the .npz by timm
    # 0.5.4's _load_weights, whose resize_pos_embed is bicubic (24x24 -> 30x30); statistics "vit" (0.5).
    "vit_small_patch16_384.augreg_in21k_ft_in1k": dict(position_interpolation="bicubic"),
    # dinov2_small_patch16_224: DINOv2 ViT-S/14 LVD-142M; kernel 14 -> 16 bicubic, table 37x37 -> 30x30 bilinear.
    "vit_small_patch14_dinov2.lvd142m": dict(position_interpolation="bilinear"),
    # eva02_small_patch16_224: EVA-02-S MIM (ImageNet-21k); kernel 14 -> 16 bicubic, table 16x16 -> 30x30 bilinear.
    "eva02_small_patch14_224.mim_in22k": dict(position_interpolation="bilinear"),
}

# Official EVA-02 / xformers names of the packed SwiGLU -> the gated MLP's (timm's) names.
BACKBONE_KEY_RENAMES = ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))


@dataclass
class BackboneLoadingReport:
    """What `load_timm_backbone` did: keys copied, source keys left unused, encoder keys left uninitialised."""

    loaded_keys: list = field(default_factory=list)
    unused_keys: list = field(default_factory=list)
    missing_keys: list = field(default_factory=list)


def _find_encoder(model):
    if isinstance(model, WeakTrModel):
        return model
    encoder = getattr(model, "weaktr", None)
    if not isinstance(encoder, WeakTrModel):
        raise TypeError(f"Expected a WeakTr model with a WeakTrModel encoder, got {type(model).__name__}.")
    return encoder


def _read_source(source):
    """A state dict from a timm model name, a timm module, a state dict, or a checkpoint file."""
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        state_dict = source
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        if str(source).endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(str(source))
        else:
            state_dict = torch.load(source, map_location="cpu", weights_only=True)
    elif isinstance(source, str):
        import timm

        try:
            return timm.create_model(source, pretrained=True).state_dict()
        except Exception as error:  # download failures come in many types
            raise RuntimeError(
                f"Could not create timm model {source!r} with pretrained weights ({error}). Without network access, "
                f"pass a local checkpoint file (.pth / .safetensors) or a timm model you have loaded."
            ) from error
    else:
        raise TypeError(f"Unsupported backbone source {type(source).__name__}: use a timm name, module, dict or file.")
    for wrapper in ("model", "state_dict", "module"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def resize_patch_kernel(weight, patch_size):
    """A patch-embedding kernel `(out, in, k, k)` resized to `patch_size`: bicubic `F.interpolate` of the raw
    weights, as the authors turn DINOv2 / EVA-02's 14x14 kernels into 16x16 (no antialias, no rescaling; not timm's
    pseudo-inverse `resample_patch_embed`)."""
    if tuple(weight.shape[-2:]) == (patch_size, patch_size):
        return weight
    resized = F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False)
    return resized.to(weight.dtype)


def source_encoder_variant(state_dict):
    """`"eva02"`, `"dinov2"` or `"vit"`: the block layout of a timm / official backbone state dict (see
    `configuration_weaktr.ENCODER_VARIANTS`)."""
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    gated = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    if gated or "blocks.0.attn.q_bias" in state_dict:
        return "eva02"
    return "dinov2" if "blocks.0.ls1.gamma" in state_dict else "vit"


def _adapt_keys(state_dict, encoder):
    """timm / official names -> the encoder's: EVA-02's `mlp.w12` / `mlp.w3`, and timm EVA's pooled-feature norm
    `fc_norm` as the all-token final norm (the authors load the MIM model's `norm` there). Rotary tables are dropped:
    the encoder computes them per forward."""
    adapted = {}
    for key, value in state_dict.items():
        if key.startswith("rope.") or ".rope." in key:
            continue
        for original, renamed in BACKBONE_KEY_RENAMES:
            key = key.replace(original, renamed)
        adapted[key] = value
    if encoder.norm is not None and "norm.weight" not in adapted and "fc_norm.weight" in adapted:
        adapted["norm.weight"], adapted["norm.bias"] = adapted.pop("fc_norm.weight"), adapted.pop("fc_norm.bias")
    return adapted


def load_timm_backbone(model, source, strict=True, position_interpolation=None):
    """
    Copy a pretrained timm ViT / DeiT / DINOv2 / EVA-02 checkpoint into the encoder of `model` (`WeakTrForCAM`,
    `WeakTrForSemanticSegmentation` or `WeakTrModel`), doing what the authors did to load it:

    - the single [CLS] token and its position row are repeated for every prefix token (the C class tokens of step 1);
    - patch position rows are resized to the model's grid: `position_interpolation` `"bicubic"` or `"bilinear"`; by
      default bicubic for step 1 and bilinear for step 2 (as each of the authors' steps does), or for step 2 the
      mode of a `PRETRAINED_BACKBONES` name;
    - a patch kernel of another size (DINOv2 / EVA-02's 14 px) is resized bicubically (`resize_patch_kernel`);
    - EVA-02's `mlp.w12` / `mlp.w3` become `mlp.fc1` / `mlp.fc2`, timm EVA's `fc_norm` becomes the final `norm`;
      classifiers, mask tokens and rotary tables are dropped; every other key is copied.

    `source` is a timm model name (downloads; needs network), a timm model, a state dict, or a local `.pth` /
    `.safetensors` file (e.g. the official `dinov2_vits14_pretrain.pth` or `eva02_S_pt_in21k_p14.pt`). Its block
    layout must be the encoder's (`config.encoder_variant`): a DINOv2 source needs `layerscale_value`, an EVA-02 one
    the EVA-02 fields (`configuration_weaktr.ENCODER_VARIANTS`).

    Returns a `BackboneLoadingReport`. With `strict=True`, encoder parameters left uninitialised or source keys that
    are neither used nor a known classifier key raise a `ValueError` naming them.
    """
    encoder = _find_encoder(model)
    if position_interpolation is None and isinstance(source, str) and encoder.norm is not None:  # step-2 encoder
        position_interpolation = PRETRAINED_BACKBONES.get(source, {}).get("position_interpolation")
    if position_interpolation not in (None, "bicubic", "bilinear"):
        raise ValueError(f"position_interpolation must be 'bicubic' or 'bilinear', got {position_interpolation!r}.")
    source_state = _read_source(source)
    variant, configured = source_encoder_variant(source_state), encoder.config.encoder_variant
    if variant != configured:
        raise ValueError(
            f"The backbone has {variant} blocks but the model's encoder is configured as {configured}; build the "
            f"model with the {variant} fields of configuration_weaktr.ENCODER_VARIANTS (train.py: --seg_encoder "
            f"{variant})."
        )
    source_state = _adapt_keys(source_state, encoder)
    target_state = encoder.state_dict()
    report = BackboneLoadingReport()
    new_state = {}

    for key, value in source_state.items():
        if key == "cls_token":
            new_state[key] = value[:, :1].expand(-1, encoder.num_prefix_tokens, -1).clone()
        elif key == "pos_embed":
            num_source_prefix = value.shape[1] - _source_patch_count(source_state)
            prefix = value[:, :1] if num_source_prefix else value.new_zeros(1, 1, value.shape[-1])
            patches = value[:, num_source_prefix:]
            side = int(round(patches.shape[1] ** 0.5))
            # Step 1 resizes ImageNet tables bicubically, step 2 bilinearly (as each of the authors' steps does).
            step_mode = "bilinear" if encoder.position_interpolation == "bilinear" else "bicubic"
            mode = position_interpolation or step_mode
            patches = resize_position_embeddings(patches, (side, side), encoder.grid_size, mode)
            new_state[key] = torch.cat([prefix.expand(-1, encoder.num_prefix_tokens, -1), patches], dim=1)
        elif key == "patch_embed.proj.weight":
            new_state[key] = resize_patch_kernel(value, encoder.config.patch_size)
        elif key in target_state:
            new_state[key] = value
        else:
            report.unused_keys.append(key)
            continue
        if new_state[key].shape != target_state[key].shape:
            raise ValueError(
                f"Backbone key {key!r} has shape {tuple(new_state[key].shape)} but the WeakTr encoder expects "
                f"{tuple(target_state[key].shape)}: the checkpoint's width/depth/patch size must match the config."
            )
        report.loaded_keys.append(key)

    report.missing_keys = [key for key in target_state if key not in new_state]
    expected_unused = UNUSED_TIMM_PREFIXES + (("norm.",) if encoder.norm is None else ())  # step 1 has no final norm
    unexpected = [key for key in report.unused_keys if not key.startswith(expected_unused)]
    if strict and (report.missing_keys or unexpected):
        raise ValueError(
            f"Backbone checkpoint does not fit the WeakTr encoder: missing {report.missing_keys}, unexpected "
            f"{unexpected}. Pass strict=False to load the rest anyway."
        )
    if report.missing_keys:
        logger.warning("Encoder keys not found in the backbone checkpoint: %s", report.missing_keys)
    if report.unused_keys:
        logger.info("Backbone keys not used by WeakTr: %s", report.unused_keys)
    encoder.load_state_dict(new_state, strict=False)
    return report


def _source_patch_count(state_dict):
    """Number of patch rows in a timm `pos_embed`: total rows minus prefix tokens (cls / dist) the checkpoint has."""
    prefix = sum(1 for key in ("cls_token", "dist_token") if key in state_dict)
    return state_dict["pos_embed"].shape[1] - prefix


__all__ = ["PRETRAINED_BACKBONES", "BackboneLoadingReport", "load_timm_backbone", "resize_patch_kernel"]
