"""Pretrained initialisation of WeakTr's encoder from timm ViT / DeiT / DeiT-III / DINOv2 / EVA-02 / DINOv3 weights.

Kept apart from the models (like timm's `checkpoint_filter_fn`) so the modeling file stays a forward pass. The
encoder uses timm's parameter names, so the mapping is mostly one to one; what differs is the number of prefix
tokens (C class tokens in step 1), the patch grid, and for the authors' step-2 backbones the patch size: DINOv2 and
EVA-02 were pretrained on 14-px patches, which the authors resize to 16 px (OnlineRetraining/segm/model/utils.py
`checkpoint_filter_fn`).

Past the paper's backbones, `timm_backbone_config` reads a WeakTr config from a built timm model (sizes, block
layout, registers, rotary settings: no table per name) and `timm_backbone_state_dict` renames its weights;
`WeakTrForCAM.from_timm_backbone` / `WeakTrForSemanticSegmentation.from_timm_backbone` put them together.
"""

import json
import logging
import math
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
        return timm_backbone_state_dict(source) if _is_timm_encoder(source) else source.state_dict()
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
    """`"dinov3"`, `"eva02"`, `"dinov2"` or `"vit"`: the block layout of a timm / official backbone state dict (see
    `configuration_weaktr.ENCODER_VARIANTS`); an encoder without a learned position table is a DINOv3 one."""
    if "pos_embed" not in state_dict and "blocks.0.norm1.weight" in state_dict:
        return "dinov3"
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    gated = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    if gated or "blocks.0.attn.q_bias" in state_dict:
        return "eva02"
    return "dinov2" if "blocks.0.ls1.gamma" in state_dict else "vit"


def merge_split_layouts(state_dict):
    """timm Eva's layouts -> the encoder's: `gamma_1` / `gamma_2` become `ls1.gamma` / `ls2.gamma`; separate
    `q_proj` / `k_proj` / `v_proj` (EVA-02-B/L) become one `qkv.weight` plus `q_bias` / `v_bias` (the key projection
    has no bias); split SwiGLU `fc1_g` / `fc1_x` become the packed `fc1`, gate first. Other keys pass unchanged."""
    merged = {}
    for key, value in state_dict.items():
        name = key.rsplit(".", 1)[-1]
        if name in ("gamma_1", "gamma_2"):
            merged[f"{key[: -len(name)]}ls{name[-1]}.gamma"] = value
        elif ".mlp.fc1_g." in key:
            merged[key.replace(".fc1_g.", ".fc1.")] = torch.cat([value, state_dict[key.replace(".fc1_g.", ".fc1_x.")]])
        elif ".attn.q_proj." in key:
            prefix = key[: key.index(".attn.q_proj.")] + ".attn."
            if name == "weight":
                merged[prefix + "qkv.weight"] = torch.cat(
                    [value, state_dict[prefix + "k_proj.weight"], state_dict[prefix + "v_proj.weight"]]
                )
            else:
                merged[prefix + "q_bias"], merged[prefix + "v_bias"] = value, state_dict[prefix + "v_proj.bias"]
        elif not any(part in key for part in (".mlp.fc1_x.", ".attn.k_proj.", ".attn.v_proj.")):
            merged[key] = value
    return merged


def _adapt_keys(state_dict, encoder):
    """timm / official names -> the encoder's: timm Eva's split layouts (`merge_split_layouts`), EVA-02's `mlp.w12` /
    `mlp.w3`, and timm EVA's pooled-feature norm `fc_norm` as the all-token final norm (the authors load the MIM
    model's `norm` there). Rotary tables are dropped: the encoder computes them per forward."""
    adapted = {}
    for key, value in merge_split_layouts(state_dict).items():
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
    source_state = _adapt_keys(_read_source(source), encoder)
    variant, configured = source_encoder_variant(source_state), encoder.config.encoder_variant
    if variant != configured:
        raise ValueError(
            f"The backbone has {variant} blocks but the model's encoder is configured as {configured}; build the "
            f"model with the {variant} fields of configuration_weaktr.ENCODER_VARIANTS (train.py: --seg_encoder "
            f"{variant})."
        )
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
            # A table of the encoder's own (possibly non-square) grid is taken as is; others are square grids.
            source_grid = encoder.grid_size if patches.shape[1] == math.prod(encoder.grid_size) else (side, side)
            # Step 1 resizes ImageNet tables bicubically, step 2 bilinearly (as each of the authors' steps does).
            step_mode = "bilinear" if encoder.position_interpolation == "bilinear" else "bicubic"
            mode = position_interpolation or step_mode
            patches = resize_position_embeddings(patches, source_grid, encoder.grid_size, mode)
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
    """Number of patch rows in a timm `pos_embed`: total rows minus prefix tokens (cls / dist) the checkpoint has,
    or all rows when only they form a square grid (DeiT-III / DINOv2-reg files: no rows for the class token)."""
    rows = state_dict["pos_embed"].shape[1]
    prefix = sum(1 for key in ("cls_token", "dist_token") if key in state_dict)
    if prefix and _is_square(rows) and not _is_square(rows - prefix):
        return rows
    return rows - prefix


def _is_square(count):
    side = int(round(count**0.5))
    return side * side == count


# ---------------------------------------------------------------------------------------------------------------------
# Any supported timm backbone: the config read from the model, its weights in the encoder's names
# ---------------------------------------------------------------------------------------------------------------------

# What `timm_backbone_config` accepts: timm's two plain-ViT classes and the families built on them.
SUPPORTED_TIMM_FAMILIES = {
    "VisionTransformer": "ViT / DeiT (vit_*, deit_*), DeiT-III (deit3_*), DINOv2 with or without registers "
    "(vit_*_patch14_dinov2, vit_*_patch14_reg4_dinov2)",
    "Eva": "EVA-02 (eva02_*_patch14_*), DINOv3 (vit_*_patch16_dinov3, vit_*_patch16_dinov3_qkvb)",
}
TIMM_ACTIVATIONS = {"GELU": "gelu", "SiLU": "silu", "QuickGELU": "quick_gelu"}
# Segmenter's mask-transformer decoder follows the encoder's width: d_model = width, heads = width / 64, MLP 4 x
# width, 2 layers (hustvl/WeakTr OnlineRetraining/segm/model/factory.py:119-125 `create_decoder`, and
# OnlineRetraining/segm/config.yml:153-156 for the depth): 384 / 6 / 1536 for S, 768 / 12 / 3072 for B, 1024 / 16 /
# 4096 for L.
DECODER_HEAD_DIM = 64


def _is_timm_encoder(module):
    return type(module).__name__ in SUPPORTED_TIMM_FAMILIES and hasattr(module, "blocks")


def _unsupported(model, feature):
    raise ValueError(
        f"timm model {_timm_name(model)} has {feature}, which WeakTr's encoder does not implement. Supported: "
        + "; ".join(SUPPORTED_TIMM_FAMILIES.values())
        + "."
    )


def _timm_name(model):
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _is_identity(module):
    return module is None or isinstance(module, torch.nn.Identity)


def _activation_name(module, model):
    name = type(module).__name__
    if name == "GELU" and getattr(module, "approximate", "none") == "tanh":
        return "gelu_pytorch_tanh"
    if name not in TIMM_ACTIVATIONS:
        _unsupported(model, f"MLP activation {name}")
    return TIMM_ACTIVATIONS[name]


def decoder_config_for_width(hidden_size):
    """The step-2 decoder fields for an encoder of `hidden_size`, as the authors' Segmenter builds it (see
    `DECODER_HEAD_DIM`)."""
    return {
        "decoder_hidden_size": hidden_size,
        "decoder_num_attention_heads": max(1, hidden_size // DECODER_HEAD_DIM),
        "decoder_intermediate_size": 4 * hidden_size,
    }


def timm_backbone_config(model):
    """
    `WeakTrConfig` encoder fields read from a built timm model: input and patch size, width, depth, heads, MLP width
    and activation, LayerNorm eps, biases, LayerScale, gated MLP (and its norm), register tokens, learned position
    table or not, rotary embedding (EVA-02's or DINOv3's, with its temperature and reference grid).

    Accepts timm's `VisionTransformer` (ViT, DeiT, DeiT-III, DINOv2 with or without registers) and `Eva` (EVA-02,
    DINOv3). Anything else, or one of them with a feature the encoder does not have (no class token, q/k norm,
    distillation token, attention-inner norm, pre-norm...), raises a `ValueError` naming it and the supported list.
    """
    family = type(model).__name__
    if not _is_timm_encoder(model):
        raise ValueError(
            f"{family} is not a supported timm backbone. Supported: " + "; ".join(SUPPORTED_TIMM_FAMILIES.values()) + "."
        )
    block, embed = model.blocks[0], model.patch_embed
    attn, mlp = block.attn, block.mlp
    if model.cls_token is None:
        _unsupported(model, "no class token")
    if getattr(model, "dist_token", None) is not None:
        _unsupported(model, "a distillation token")
    for name, module in (("a pre-transformer norm", getattr(model, "norm_pre", None)),
                         ("a patch-embedding norm", getattr(embed, "norm", None)),
                         ("q/k normalisation", getattr(attn, "q_norm", None)),
                         ("a norm inside attention", getattr(attn, "norm", None))):  # fmt: skip
        if not _is_identity(module):
            _unsupported(model, name)
    if getattr(attn, "gate", None) is not None or type(block).__name__ not in ("Block", "EvaBlock"):
        _unsupported(model, f"{type(block).__name__} blocks")
    if getattr(model, "patch_drop", None) is not None and not _is_identity(model.patch_drop):
        _unsupported(model, "patch dropout")
    patch_size = tuple(embed.patch_size)
    if patch_size[0] != patch_size[1]:
        _unsupported(model, f"non-square patches {patch_size}")
    height, width = embed.img_size
    fields = {
        "image_size": height if height == width else (height, width),
        "patch_size": patch_size[0],
        "num_channels": embed.proj.in_channels,
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": attn.num_heads,
        "intermediate_size": mlp.fc2.in_features,
        "layer_norm_eps": block.norm1.eps,
        "num_register_tokens": int(model.reg_token.shape[1]) if getattr(model, "reg_token", None) is not None else 0,
        "use_absolute_position_embeddings": model.pos_embed is not None,
    }
    head_dim = getattr(attn, "head_dim", None) or attn.proj.in_features // attn.num_heads  # older timm: no attribute
    if attn.num_heads * head_dim != model.embed_dim:
        _unsupported(model, f"a head width {head_dim} other than width / heads")

    mlp_kind = type(mlp).__name__
    gated = mlp_kind in ("GluMlp", "SwiGLU")
    if mlp_kind not in ("Mlp", "GluMlp", "SwiGLU") or (mlp_kind == "GluMlp" and mlp.gate_last):
        _unsupported(model, f"a {mlp_kind} MLP")
    mlp_norm = getattr(mlp, "norm", None)
    if not _is_identity(mlp_norm) and not gated:
        _unsupported(model, "a norm inside a plain MLP")
    fields.update(use_gated_mlp=gated, use_mlp_norm=not _is_identity(mlp_norm),
                  hidden_act=_activation_name(mlp.act, model))  # fmt: skip

    if family == "Eva":
        has_bias = attn.q_bias is not None if attn.qkv is not None else attn.q_proj.bias is not None
        fields.update(qkv_bias=has_bias, key_bias=not has_bias)  # Eva's key bias is always zero
        fields["layerscale_value"] = block.init_values if block.gamma_1 is not None else None
        if (block.gamma_1 is None) != (block.gamma_2 is None):
            _unsupported(model, "LayerScale on the attention branch only")
        fields.update(_rope_fields(model))
    else:
        fields.update(qkv_bias=attn.qkv.bias is not None, key_bias=True, use_rope=False)
        scale = block.ls1
        fields["layerscale_value"] = None if _is_identity(scale) else float(scale.init_values)
    final_norm = model.norm if not _is_identity(model.norm) else getattr(model, "fc_norm", None)
    if _is_identity(final_norm):
        _unsupported(model, "no final LayerNorm")
    return fields


def _rope_fields(model):
    rope = model.rope
    if rope is None:
        return {"use_rope": False}
    kind = type(rope).__name__
    if getattr(rope, "grid_offset", 0.0) or getattr(rope, "grid_indexing", "ij") != "ij" or model.rope_mixed:
        _unsupported(model, "a shifted, xy-indexed or mixed rotary grid")
    if kind == "RotaryEmbeddingCat" and not rope.in_pixels and not rope.rotate_half and rope.ref_feat_shape:
        reference = tuple(rope.ref_feat_shape)
        if reference[0] != reference[1] or getattr(rope, "linear_bands", False):
            _unsupported(model, f"a rotary reference grid {reference}")
        return {"use_rope": True, "rope_type": "eva02", "rope_theta": float(rope.temperature),
                "rope_reference_grid": int(reference[0])}  # fmt: skip
    if kind == "RotaryEmbeddingDinoV3" and rope.rotate_half and rope.normalize_coords == "separate":
        if rope.min_period is not None or rope.max_period is not None:
            _unsupported(model, "a DINOv3 rotary embedding with min/max periods")
        # Coordinate augmentations (shift / jitter / rescale) act only while timm trains; WeakTr has none.
        return {"use_rope": True, "rope_type": "dinov3", "rope_theta": float(rope.temperature)}
    _unsupported(model, f"a {kind} rotary embedding with these settings")


def timm_backbone_state_dict(model):
    """The weights of a supported timm model (see `timm_backbone_config`) in the encoder's names and layout, ready
    for `load_timm_backbone`:

    - Eva's split layouts are merged (`merge_split_layouts`);
    - a position table without a row for the class token (`no_embed_class`: DeiT-III, DINOv2-reg) gets a zero row;
      register rows of a table that has them are added to the register tokens (a constant, so the sum is exact);
    - rotary buffers and the classifier are left for `load_timm_backbone` to drop.
    """
    timm_backbone_config(model)  # refuses unsupported models with the supported list
    state = merge_split_layouts(model.state_dict())
    pos_embed = state.get("pos_embed")
    if pos_embed is not None:
        registers = state["reg_token"].shape[1] if "reg_token" in state else 0
        if getattr(model, "no_embed_class", False):
            pos_embed = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[-1]), pos_embed], dim=1)
        elif registers:
            state["reg_token"] = state["reg_token"] + pos_embed[:, 1 : 1 + registers]
            pos_embed = torch.cat([pos_embed[:, :1], pos_embed[:, 1 + registers :]], dim=1)
        state["pos_embed"] = pos_embed
    return state


def _timm():
    try:
        import timm
    except ImportError as error:
        raise ImportError("Building WeakTr from a timm backbone needs timm: pip install timm.") from error
    return timm


def resolve_timm_backbone(source, arch=None, pretrained=True):
    """
    A timm model from `source`:

    - a timm model instance: returned as is;
    - a folder in timm's own save format (`timm.models.save_for_hf`: `config.json` with the architecture and its
      arguments, plus `model.safetensors`): built offline through timm's `local-dir:` source;
    - a checkpoint file (`.safetensors`, `.pth`, `.bin`) with `arch`, the timm name it was saved from: `arch` is built
      without weights and the file loaded into it (through timm's `checkpoint_filter_fn` when the keys are the
      official ones);
    - a timm name (`vit_base_patch16_dinov3_qkvb.lvd1689m`): built with `pretrained` weights (downloads).
    """
    if isinstance(source, torch.nn.Module):
        return source
    timm = _timm()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Unsupported backbone source {type(source).__name__}: a timm model, name, folder or file.")
    path = os.fspath(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"Backbone folder {path!r} has no config.json: save the timm model with "
                "timm.models.save_for_hf(model, folder), or give a checkpoint file with its timm name (arch)."
            )
        with open(os.path.join(path, "config.json")) as handle:
            architecture = json.load(handle).get("architecture")
        if not architecture:
            raise ValueError(f"{path}/config.json names no 'architecture': it is not a timm model folder.")
        return timm.create_model(f"local-dir:{os.path.abspath(path)}", pretrained=True)
    if os.path.isfile(path):
        if arch is None:
            raise ValueError(
                f"Backbone file {path!r} holds weights only: also give the timm architecture it was saved from "
                "(arch=..., train.py --backbone_arch NAME), e.g. vit_small_patch16_dinov3."
            )
        model = timm.create_model(arch, pretrained=False)
        state = _read_source(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            filter_fn = getattr(__import__(type(model).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
            if filter_fn is None:
                raise
            model.load_state_dict(filter_fn(state, model), strict=True)
        return model
    if os.sep in path or path.endswith((".safetensors", ".pth", ".bin", ".pt")):
        raise FileNotFoundError(f"Backbone path {path!r} does not exist.")
    try:
        return timm.create_model(path, pretrained=pretrained)
    except Exception as error:  # unknown names and download failures come in many types
        raise RuntimeError(
            f"Could not create timm model {path!r} (pretrained={pretrained}): {error}. Without network access, save "
            "the model locally (timm.models.save_for_hf) and pass the folder, or a checkpoint file with its arch."
        ) from error


@dataclass
class TimmBackbone:
    """A resolved timm backbone: the model, the `WeakTrConfig` fields for one step, and its image statistics."""

    model: torch.nn.Module
    config_fields: dict
    image_mean: tuple | None = None
    image_std: tuple | None = None


def prepare_timm_backbone(source, step, arch=None, pretrained=True):
    """
    Everything a training script needs to build a WeakTr model of `step` (`"cam"` or `"segmentation"`) on a timm
    backbone: the timm model (see `resolve_timm_backbone`), the config fields read from it (for step 2 with the
    decoder following the encoder's width, as the authors' Segmenter) and the mean / std it was trained with. Build
    the config with `WeakTrConfig(**fields, **recipe_fields)`, then `load_timm_backbone(model, backbone.model)`.
    """
    if step not in ("cam", "segmentation"):
        raise ValueError(f"step must be 'cam' or 'segmentation', got {step!r}.")
    model = resolve_timm_backbone(source, arch=arch, pretrained=pretrained)
    fields = timm_backbone_config(model)
    if step == "segmentation":
        fields.update(decoder_config_for_width(fields["hidden_size"]))
    data = getattr(model, "pretrained_cfg", None) or {}
    mean, std = data.get("mean"), data.get("std")
    return TimmBackbone(model, fields, tuple(mean) if mean else None, tuple(std) if std else None)


def from_timm_backbone(model_class, source, id2label=None, arch=None, pretrained=True, position_interpolation=None,
                       **config_overrides):  # fmt: skip
    """`model_class` (`WeakTrForCAM` or `WeakTrForSemanticSegmentation`) built on a timm backbone's config and
    weights; the implementation of `model_class.from_timm_backbone`."""
    from .configuration_weaktr import WeakTrConfig
    from .modeling_weaktr import WeakTrForSemanticSegmentation

    step = "segmentation" if issubclass(model_class, WeakTrForSemanticSegmentation) else "cam"
    backbone = prepare_timm_backbone(source, step, arch=arch, pretrained=pretrained)
    fields = dict(backbone.config_fields, **config_overrides)
    if id2label is not None:
        fields["id2label"] = id2label
    model = model_class(WeakTrConfig(**fields))
    load_timm_backbone(model, backbone.model, position_interpolation=position_interpolation)
    return model


__all__ = [
    "PRETRAINED_BACKBONES",
    "SUPPORTED_TIMM_FAMILIES",
    "BackboneLoadingReport",
    "TimmBackbone",
    "decoder_config_for_width",
    "load_timm_backbone",
    "prepare_timm_backbone",
    "resize_patch_kernel",
    "resolve_timm_backbone",
    "timm_backbone_config",
    "timm_backbone_state_dict",
]
