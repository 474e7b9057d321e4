"""ImageNet initialisation of WeakTr's encoder from a timm ViT / DeiT checkpoint.

Kept apart from the models (like timm's `checkpoint_filter_fn`) so the modeling file stays a forward pass. The
encoder uses timm's parameter names, so the mapping is mostly one to one; what differs is the number of prefix
tokens (C class tokens in step 1) and the patch grid.
"""

import logging
import os
from dataclasses import dataclass, field

import torch

from .modeling_weaktr import WeakTrModel, resize_position_embeddings

logger = logging.getLogger(__name__)

# timm keys that no WeakTr encoder uses: classifier heads, distillation token, pooled-feature norm.
UNUSED_TIMM_PREFIXES = ("head.", "head_dist.", "dist_token", "fc_norm.", "pre_logits.")


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


def load_timm_backbone(model, source, strict=True):
    """
    Copy an ImageNet timm ViT/DeiT checkpoint into the encoder of `model` (`WeakTrForCAM`,
    `WeakTrForSemanticSegmentation` or `WeakTrModel`).

    The single [CLS] token and its position row are repeated for every prefix token (the C class tokens of step 1),
    patch position rows are resized to the model's grid (bicubic for step 1, bilinear for step 2, as the authors), the classifier is dropped, and every other key is
    copied. `source` is a timm model name (downloads; needs network), a timm model, a state dict, or a local
    `.pth` / `.safetensors` file.

    Returns a `BackboneLoadingReport`. With `strict=True`, encoder parameters left uninitialised or source keys that
    are neither used nor a known classifier key raise a `ValueError` naming them.
    """
    encoder = _find_encoder(model)
    source_state = _read_source(source)
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
            mode = "bilinear" if encoder.position_interpolation == "bilinear" else "bicubic"
            patches = resize_position_embeddings(patches, (side, side), encoder.grid_size, mode)
            new_state[key] = torch.cat([prefix.expand(-1, encoder.num_prefix_tokens, -1), patches], dim=1)
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


__all__ = ["BackboneLoadingReport", "load_timm_backbone"]
