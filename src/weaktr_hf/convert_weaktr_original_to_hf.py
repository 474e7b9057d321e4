"""Convert the WeakTr authors' released checkpoints (hustvl/WeakTr) to weaktr-hf `from_pretrained` folders.

Step 1 (`--stage cam`) checkpoints hold the CAM model (C class tokens, 3x3-conv head, Adaptive Attention Fusion);
step 2 (`--stage seg`) checkpoints hold the Segmenter-style model (`encoder.*` ViT, `decoder.*` mask transformer).
Both are plain `torch.save` dicts, usually under a `model` key (the authors' `main.py:460` and
`OnlineRetraining/segm/train.py:350` save them so). Files
are read with `torch.load(weights_only=True)`: nothing in them is unpickled as code.

The config is inferred from tensor shapes; every source key is either mapped or one of the few keys the authors'
models carry but never use (`UNUSED_KEYS`), and anything else is an error. `convert_state_dict` is the mapping as a
function (the training script can initialise from an authors' checkpoint with it); `to_original_state_dict` is its
inverse, so a round trip can be checked for losslessness.

    weaktr-convert --checkpoint_path WeakTr_CAM.pth --stage cam --dataset voc12 --output_dir weaktr-deit-small-voc12-cam

The authors' released weights are MIT-licensed (hustvl/WeakTr); the converted folders and their cards keep that
licence (this package itself is Apache-2.0).
"""

import argparse
import hashlib
import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from . import hub
from .configuration_weaktr import AAF_POOLINGS, WeakTrConfig
from .image_processing_weaktr import IMAGE_STATISTICS, WeakTrImageProcessor, evaluation_processor
from .labels import BACKGROUND, label_layouts
from .modeling_weaktr import WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrPreTrainedModel, build_2d_rope

logger = logging.getLogger(__name__)

STAGES = ("cam", "seg")
DATASETS = ("voc12", "coco14")
MODEL_CLASSES = {"cam": WeakTrForCAM, "seg": WeakTrForSemanticSegmentation}

# Keys the authors' models hold but never use in their forward pass. Step 1: the ViT's final norm (the CAM forward
# never applies it). Step 2: the ImageNet classifier heads of the encoder and the DeiT distillation token (dropped:
# our step-2 encoder has one prefix token; see `_drop_distillation_token`).
UNUSED_KEYS = {
    "cam": ("norm.weight", "norm.bias"),
    "seg": (
        "encoder.head.weight", "encoder.head.bias", "encoder.head_dist.weight", "encoder.head_dist.bias",
        "encoder.dist_token",
    ),
}  # fmt: skip

# Image normalisation of the authors' recipes (see IMAGE_STATISTICS): ImageNet for DeiT-S and DINOv2-S, 0.5 for the
# augreg ViT-S, OpenAI CLIP for EVA-02-S.
NORMALIZATIONS = IMAGE_STATISTICS

# The authors' EVA-02-S saves its fixed rotary table as buffers: once for the encoder and again in every attention
# layer (one shared module). The tables are checked against the recomputed ones and then dropped: weaktr-hf builds
# them per forward for the input's grid.
ROPE_KEY = re.compile(r"^encoder\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
ROPE_TOLERANCE = 1e-5  # float32 cos/sin of angles up to 16 rad; saved by another torch version

# Authors' step-2 variants that WeakTrForSemanticSegmentation cannot represent.
UNSUPPORTED_KEY_HINTS = ((re.compile(r"^decoder\.head\."), "a linear decoder instead of the mask transformer"),)

# Backbones of the released step-2 checkpoints (the authors' README): the variant is read from the keys; a plain
# ViT is DeiT-S or the augreg ViT-S, told apart only by the image statistics of its recipe.
BACKBONE_NAMES = {"deit-s": "DeiT-S", "vit-s": "ViT-S (ImageNet-21k)", "dinov2-s": "DINOv2-S", "eva02-s": "EVA-02-S"}

PAPER = (
    "Zhu et al., WeakTr: Exploring Plain Vision Transformer for Weakly-supervised Semantic Segmentation "
    "(arXiv 2304.01184)"
)
# Numbers the paper / the authors' README report for their released checkpoints (labelled as theirs).
REPORTED_RESULTS = {
    ("cam", "voc12"): [
        "mIoU of the CAM pseudo-labels on PASCAL VOC 2012 train, DeiT-S: **69.4%** (multi-scale CAMs, background "
        "threshold, dense CRF)",
    ],
    ("cam", "coco14"): [
        "mIoU of the CAM pseudo-labels on COCO 2014 train, DeiT-S: **42.6%** (multi-scale CAMs, background "
        "threshold, dense CRF)",
    ],
    # Step 2: val mIoU of each released backbone (the authors' README, step-2 table).
    ("seg", "voc12"): {"deit-s": "74.0", "vit-s": "78.4", "dinov2-s": "75.8", "eva02-s": "78.5"},
    ("seg", "coco14"): {"deit-s": "46.9", "vit-s": "50.3", "dinov2-s": "48.9", "eva02-s": "51.1"},
}
# The same numbers for the model-index: (metric name, mIoU %, split) of each stage, labelled as the paper's.
REPORTED_CAM_MIOU = {"voc12": 69.4, "coco14": 42.6}
# Names for the card's text and the model-index's dataset type (not Hub dataset ids: the card lists no `datasets`).
DATASET_CARD_NAMES = {"voc12": ("PASCAL VOC 2012", "pascal-voc-2012"), "coco14": ("COCO 2014", "coco-2014")}
# The authors' evaluation geometry (OR/config.yml:181-184; OR/model/utils.py:106-118) and decoder ensemble
# (--backbone multi --weight 0.8, OR/eval/miou.py:84-85): what a converted segmenter's processor and config default to.
AUTHORS_EVALUATION = dict(base_size=520, min_size=480, window_size=480, window_stride=320)
AUTHORS_AUXILIARY_ENSEMBLE_WEIGHT = 0.8


# ---------------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _numpy_scalar_globals():
    """numpy scalar and numeric dtype constructors: they rebuild numbers (e.g. a saved `miou`), never run code."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    numeric = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
               "float64")  # fmt: skip
    return [core.multiarray.scalar, np.dtype, *{type(np.dtype(name)) for name in numeric}]


def load_original_checkpoint(checkpoint_path):
    """Read an authors' checkpoint file (`.pth` / `.pt` via `torch.load(weights_only=True)`, or `.safetensors`).

    Only tensors, containers, numbers and numpy scalars are rebuilt. A file that needs any other object unpickled
    raises a `ValueError` naming those objects and saying how to re-save the weights as a plain state dict.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            objects = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # the listing is a courtesy; the message below stands without it
            objects = []
        allowed = {f"{obj.__module__}.{obj.__qualname__}" for obj in _numpy_scalar_globals()}
        objects = [name for name in objects if name not in allowed]
        raise ValueError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True): it stores objects that would have to "
            f"be unpickled as code ({', '.join(objects) or error}). This converter never does that. If you trust "
            f"the file, re-save its weights as a plain state dict and convert that file instead:\n"
            f"    python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save(c.get('model', c), 'weights_only.pth')\""
        ) from None


def unwrap_state_dict(checkpoint):
    """The model's state dict inside a checkpoint: under `model` / `state_dict` / `module` keys (possibly nested),
    with a DistributedDataParallel `module.` prefix removed from the key names."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"Expected a checkpoint dict (a state dict, or a dict with the state dict under 'model'), got "
            f"{type(checkpoint).__name__}."
        )
    state_dict = checkpoint
    while True:
        wrapper = next((k for k in ("model", "state_dict", "module") if isinstance(state_dict.get(k), Mapping)), None)
        if wrapper is None:
            break
        state_dict = state_dict[wrapper]
    unwrapped = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: expected a state dict of the "
                f"authors' model (top-level keys {list(checkpoint)[:10]})."
            )
        name = key.removeprefix("module.")
        if name in unwrapped:
            raise ValueError(f"Checkpoint holds both {name!r} and 'module.{name}'; keep one copy of the weights.")
        unwrapped[name] = value
    return unwrapped


# ---------------------------------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------------------------------


# EVA-02's packed SwiGLU (xformers names) -> the gated MLP's names (timm's): w12 = [gate; value] -> fc1, w3 -> fc2.
GATED_MLP_RENAMES = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))


def original_key_to_hf(key, stage):
    """Authors' key -> weaktr-hf key (or None for a key this mapping does not know)."""
    if stage == "cam":
        if key.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.")):
            return f"weaktr.{key}"
        if key.startswith(("head.", "adaptive_attention_fusion.")):
            return key
        return None
    if key.startswith("encoder."):
        key = "weaktr." + key.removeprefix("encoder.")
        for original, renamed in GATED_MLP_RENAMES:
            key = key.replace(original, renamed)
        return key
    if key.startswith("decoder."):
        return key
    return None


def hf_key_to_original(key, stage, gated_mlp=False):
    """weaktr-hf key -> authors' key (the inverse of `original_key_to_hf`; `gated_mlp` for an EVA-02 encoder)."""
    if stage == "cam":
        return key.removeprefix("weaktr.")
    if key.startswith("weaktr."):
        key = "encoder." + key.removeprefix("weaktr.")
        for original, renamed in GATED_MLP_RENAMES if gated_mlp else ():
            key = key.replace(renamed, original)
        return key
    return key


def _check_stage(stage):
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} ('cam' = step 1, 'seg' = step 2), got {stage!r}.")


def _require(state_dict, key, stage):
    """`state_dict[key]`, or an error that says which stage the keys look like instead."""
    if key in state_dict:
        return state_dict[key]
    hint = ""
    if stage == "cam" and any(k.startswith("encoder.") for k in state_dict):
        hint = " Its keys start with 'encoder.' as a step-2 checkpoint's do: use stage 'seg'."
    elif stage == "seg" and "cls_token" in state_dict:
        hint = " Its keys look like a step-1 checkpoint's (top-level 'cls_token'): use stage 'cam'."
    elif stage == "cam" and getattr(state_dict.get("head.weight"), "ndim", 0) == 2:
        hint = (
            " It has a linear 'head' like an ImageNet ViT classifier; initialise a new model from such weights with "
            "weaktr_hf.load_timm_backbone instead."
        )
    raise ValueError(
        f"Checkpoint has no {key!r}, which every step-{1 if stage == 'cam' else 2} ({stage!r}) checkpoint of the "
        f"authors holds.{hint}"
    )


def _layer_count(state_dict, prefix):
    """Number of transformer blocks under `prefix` (`blocks.` / `encoder.blocks.` / `decoder.blocks.`)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, state_dict) if m}
    if not indices:
        raise ValueError(f"Checkpoint has no '{prefix}<i>.*' keys: no transformer blocks found.")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ValueError(f"Checkpoint blocks '{prefix}<i>' are not numbered 0..{max(indices)}: missing {missing}.")
    return len(indices)


def _heads_by_width(width, what):
    """DeiT / ViT encoders and the authors' decoder (`n_heads = width // 64`) use 64-wide attention heads."""
    if width % 64:
        raise ValueError(
            f"Cannot infer the {what} attention heads of width {width} (not a multiple of the usual 64-wide heads); "
            f"pass it explicitly ({'--decoder_num_attention_heads' if what == 'decoder' else '--num_attention_heads'})."
        )
    return width // 64


def _patch_grid(num_patch_rows, patch_size, image_size, what):
    """Training image size from the number of patch rows of a position table (square unless given)."""
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (height // patch_size) * (width // patch_size) != num_patch_rows:
            raise ValueError(
                f"image_size {image_size!r} gives {(height // patch_size) * (width // patch_size)} patches at patch "
                f"size {patch_size}, but {what} has {num_patch_rows} patch rows."
            )
        return image_size
    side = math.isqrt(num_patch_rows)
    if side * side != num_patch_rows:
        raise ValueError(
            f"{what} has {num_patch_rows} patch rows, not a square grid; pass image_size=(height, width) of the "
            f"training crop."
        )
    return side * patch_size


def _encoder_fields(state_dict, stage, num_prefix_tokens, image_size):
    """Encoder config fields read from the shapes of the patch embedding, position table and blocks."""
    prefix = "encoder." if stage == "seg" else ""
    patch_weight = _require(state_dict, f"{prefix}patch_embed.proj.weight", stage)
    hidden_size, num_channels, patch_h, patch_w = patch_weight.shape
    if patch_h != patch_w:
        raise ValueError(f"Patch embedding kernel is {patch_h}x{patch_w}; only square patches are supported.")
    pos_embed = _require(state_dict, f"{prefix}pos_embed", stage)
    num_patch_rows = pos_embed.shape[1] - num_prefix_tokens
    layers = _layer_count(state_dict, f"{prefix}blocks.")
    fields = dict(
        hidden_size=hidden_size,
        num_channels=num_channels,
        patch_size=patch_h,
        image_size=_patch_grid(num_patch_rows, patch_h, image_size, f"'{prefix}pos_embed'"),
        num_hidden_layers=layers,
    )
    fields.update(_encoder_variant_fields(state_dict, f"{prefix}blocks.0.", stage))
    # The authors' EVA-02 always applies RoPE, and rebuilds its table when a checkpoint lacks it.
    if f"{prefix}rope.freqs_cos" in state_dict or fields.get("use_gated_mlp") or fields.get("key_bias") is False:
        fields["use_rope"] = True
    return fields


def _encoder_variant_fields(state_dict, block, stage):
    """MLP, bias and LayerScale fields of the encoder, read from the keys of its first block (`block` prefix).

    LayerScale keys mean DINOv2 (initial value 1.0, as the authors'; the weights overwrite it); a packed `mlp.w12`
    and `attn.q_bias` mean EVA-02's gated MLP (width `w3`'s inputs, SiLU gate) and query/value-only biases.
    """
    fields = {}
    if f"{block}mlp.w12.weight" in state_dict:
        packed = state_dict[f"{block}mlp.w12.weight"]
        width = _require(state_dict, f"{block}mlp.w3.weight", stage).shape[1]
        if packed.shape[0] != 2 * width:
            raise ValueError(
                f"{block}mlp.w12.weight has {packed.shape[0]} rows, but a packed SwiGLU feeding "
                f"{block}mlp.w3 ({width} inputs) needs {2 * width}: gate and value halves."
            )
        fields.update(use_gated_mlp=True, hidden_act="silu", intermediate_size=width)
    else:
        fields["intermediate_size"] = _require(state_dict, f"{block}mlp.fc1.weight", stage).shape[0]
    if f"{block}attn.q_bias" in state_dict:
        fields.update(qkv_bias=True, key_bias=False)
    else:
        fields["qkv_bias"] = f"{block}attn.qkv.bias" in state_dict
    if f"{block}ls1.gamma" in state_dict:
        fields["layerscale_value"] = 1.0
    return fields


def _dataset_layouts(stage):
    """Known class layouts of a step: dataset -> list of id2label (VOC; COCO raw ids first, then contiguous)."""
    with_background = stage == "seg"
    layouts = label_layouts()
    return {
        "voc12": [layouts[("voc12", with_background)]],
        "coco14": [layouts[("coco14-raw", with_background)], layouts[("coco14", with_background)]],
    }


def infer_dataset(stage, num_labels):
    """The dataset whose class count (20 / 21 VOC, 90 / 91 COCO raw ids, 80 / 81 COCO contiguous) is `num_labels`."""
    for name, candidates in _dataset_layouts(stage).items():
        if any(len(layout) == num_labels for layout in candidates):
            return name
    return None


def resolve_id2label(stage, num_labels, dataset=None):
    """Class names for `num_labels` classes of a step-1 (`"cam"`) or step-2 (`"seg"`) model.

    With `dataset` the layout must match the class count; without, it is inferred from the count (`infer_dataset`),
    else the names are generic (`class_<i>`, with background as label 0 for step 2).
    """
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
    name = dataset or infer_dataset(stage, num_labels)
    if name is not None:
        candidates = _dataset_layouts(stage)[name]
        for layout in candidates:
            if len(layout) == num_labels:
                return dict(layout)
        counts = " or ".join(str(len(layout)) for layout in candidates)
        raise ValueError(
            f"The checkpoint has {num_labels} classes, but a step-{1 if stage == 'cam' else 2} {name} model has "
            f"{counts}. Check --dataset (or leave it out for generic class names)."
        )
    logger.info("%d classes match no known dataset layout: using generic class names.", num_labels)
    if stage == "seg":
        return {0: BACKGROUND, **{i: f"class_{i}" for i in range(1, num_labels)}}
    return {i: f"class_{i}" for i in range(num_labels)}


def _cam_config_fields(state_dict, overrides):
    num_labels = _require(state_dict, "cls_token", "cam").shape[1]
    fields = _encoder_fields(state_dict, "cam", num_labels, overrides.get("image_size"))
    fields["num_labels"] = num_labels
    head_in = _require(state_dict, "adaptive_attention_fusion.attn_head_ffn.0.weight", "cam")
    feat_in = _require(state_dict, "adaptive_attention_fusion.attn_feat_ffn.0.weight", "cam")
    # The fusion sees K = layers x heads attention maps, so its first linear fixes the number of heads.
    reduced_channels, channels = head_in.shape
    if channels % fields["num_hidden_layers"]:
        raise ValueError(
            f"adaptive_attention_fusion.attn_head_ffn.0.weight has {channels} inputs, not a multiple of the "
            f"{fields['num_hidden_layers']} layers: this is not a WeakTr step-1 fusion module."
        )
    heads = channels // fields["num_hidden_layers"]
    requested = overrides.get("num_attention_heads")
    if requested is not None and requested != heads:
        raise ValueError(
            f"num_attention_heads={requested} disagrees with the checkpoint: its Adaptive Attention Fusion weighs "
            f"{channels} attention maps = {fields['num_hidden_layers']} layers x {heads} heads."
        )
    fields["num_attention_heads"] = heads
    fields["aaf_reduction"] = channels // reduced_channels
    fields["aaf_feat_reduction"] = (fields["hidden_size"] // heads) // feat_in.shape[0]
    fields["layer_norm_eps"] = 1e-6  # timm DeiT norm layer of the step-1 model
    return fields


def _seg_config_fields(state_dict, overrides):
    num_prefix_tokens = 2 if "encoder.dist_token" in state_dict else 1
    fields = _encoder_fields(state_dict, "seg", num_prefix_tokens, overrides.get("image_size"))
    fields["num_attention_heads"] = overrides.get("num_attention_heads") or _heads_by_width(
        fields["hidden_size"], "encoder"
    )
    cls_emb = _require(state_dict, "decoder.cls_emb", "seg")
    proj_dec = _require(state_dict, "decoder.proj_dec.weight", "seg")
    if proj_dec.shape[1] != fields["hidden_size"]:
        raise ValueError(
            f"decoder.proj_dec.weight takes {proj_dec.shape[1]} inputs but the encoder is {fields['hidden_size']} "
            f"wide: encoder and decoder come from different models."
        )
    fields["num_labels"] = cls_emb.shape[1]
    fields["decoder_hidden_size"] = proj_dec.shape[0]
    fields["decoder_num_hidden_layers"] = _layer_count(state_dict, "decoder.blocks.")
    fields["decoder_intermediate_size"] = _require(state_dict, "decoder.blocks.0.mlp.fc1.weight", "seg").shape[0]
    fields["decoder_num_attention_heads"] = overrides.get("decoder_num_attention_heads") or _heads_by_width(
        fields["decoder_hidden_size"], "decoder"
    )
    fields["layer_norm_eps"] = 1e-5  # the authors' step-2 ViT uses nn.LayerNorm's default epsilon
    fields["decoder_layer_norm_eps"] = 1e-5
    return fields


def _seg_fusion_defaults(fields, overrides):
    """Step 2 has no fusion module, but WeakTrConfig validates the step-1 reductions against the encoder size: keep
    the defaults unless an encoder too small for them says otherwise."""
    defaults = WeakTrConfig()
    heads = fields["num_attention_heads"]
    channels, head_dim = fields["num_hidden_layers"] * heads, max(fields["hidden_size"] // heads, 1)
    return {
        "aaf_reduction": overrides.get("aaf_reduction", min(defaults.aaf_reduction, channels)),
        "aaf_feat_reduction": overrides.get("aaf_feat_reduction", min(defaults.aaf_feat_reduction, head_dim)),
    }


def _drop_distillation_token(state_dict):
    """Remove a DeiT distillation token and its position row (row 1: the table is [cls, dist, patches])."""
    if "encoder.dist_token" not in state_dict:
        return state_dict
    state_dict = dict(state_dict)
    pos_embed = state_dict["encoder.pos_embed"]
    state_dict["encoder.pos_embed"] = torch.cat([pos_embed[:, :1], pos_embed[:, 2:]], dim=1)
    logger.warning(
        "The checkpoint's encoder has a DeiT distillation token; it is dropped with its position row. In the "
        "authors' model that token also takes part in self-attention, so the converted model's outputs differ "
        "from the source model's."
    )
    return state_dict


def _unsupported_variant(keys):
    for key in keys:
        for pattern, what in UNSUPPORTED_KEY_HINTS:
            if pattern.search(key):
                return f" Key {key!r} indicates {what}, which weaktr-hf does not implement."
    return ""


def convert_state_dict(state_dict, stage, dataset=None, **config_overrides):
    """
    Convert an authors' state dict (optionally wrapped under `model` / `module.`) to a weaktr-hf config and state
    dict for `WeakTrForCAM` (`stage="cam"`) or `WeakTrForSemanticSegmentation` (`stage="seg"`).

    Shapes give the width, depth, patch and grid size, MLP width, class count, the fusion's reductions and (step 1)
    the number of heads; `config_overrides` set any other `WeakTrConfig` field (e.g. `num_attention_heads` /
    `decoder_num_attention_heads` for step 2, `aaf_pooling`, `id2label`) and must agree with the shapes. `dataset`
    (`"voc12"` / `"coco14"`) picks the class names (see `resolve_id2label`).

    Returns `(config, state_dict)`; raises `ValueError` naming any source key that is neither mapped nor in
    `UNUSED_KEYS`, any key the model needs that the checkpoint lacks, and any shape mismatch.
    """
    _check_stage(stage)
    known_fields = set(WeakTrConfig().to_dict())
    unknown = sorted(set(config_overrides) - known_fields)
    if unknown:
        raise ValueError(f"Unknown WeakTrConfig fields {unknown}; see WeakTrConfig's docstring for valid names.")
    if "aaf_pooling" in config_overrides and config_overrides["aaf_pooling"] not in AAF_POOLINGS:
        raise ValueError(f"aaf_pooling must be one of {AAF_POOLINGS}, got {config_overrides['aaf_pooling']!r}.")
    source = unwrap_state_dict(state_dict)
    variant_hint = _unsupported_variant(source)
    if variant_hint:
        raise ValueError(f"This checkpoint is not a WeakTr model weaktr-hf can represent.{variant_hint}")

    read_fields = _cam_config_fields if stage == "cam" else _seg_config_fields
    fields = read_fields(source, config_overrides)
    if stage == "seg":
        source = _drop_distillation_token(source)
    for name, value in config_overrides.items():
        if name in fields and name != "image_size" and value != fields[name]:
            raise ValueError(f"{name}={value!r} disagrees with the checkpoint's shapes, which give {fields[name]!r}.")
    overrides = {k: v for k, v in config_overrides.items() if k not in ("id2label", "label2id")}
    if stage == "seg":
        overrides.update(_seg_fusion_defaults(fields, overrides))
    num_labels = fields.pop("num_labels")
    id2label = config_overrides.get("id2label")
    if id2label is None:
        id2label = resolve_id2label(stage, num_labels, dataset)
    elif len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries but the checkpoint has {num_labels} classes.")
    config = WeakTrConfig(**{**fields, **overrides, "id2label": {int(k): v for k, v in id2label.items()}})
    _check_reductions(config, source, stage)

    expected = _expected_shapes(config, stage)
    rope_tables = {key: value for key, value in source.items() if ROPE_KEY.match(key)} if stage == "seg" else {}
    _check_rope_tables(rope_tables, config)
    converted, unmapped = {}, []
    for key, value in source.items():
        target = original_key_to_hf(key, stage)
        if target is None or target not in expected:
            if key not in UNUSED_KEYS[stage] and key not in rope_tables:
                unmapped.append(key)
            continue
        converted[target] = value
    gated = config.use_gated_mlp
    missing = [hf_key_to_original(key, stage, gated) for key in expected if key not in converted]
    if unmapped or missing:
        raise ValueError(
            f"The checkpoint does not match a step-{1 if stage == 'cam' else 2} WeakTr model with the inferred config"
            f" ({_describe(config, stage)}): unexpected keys {unmapped}, missing keys {missing}. Unexpected keys are "
            f"neither mapped nor known to be unused; check --stage and that the file is an authors' WeakTr "
            f"checkpoint."
        )
    for key, value in converted.items():
        if tuple(value.shape) != expected[key]:
            raise ValueError(
                f"Checkpoint key {hf_key_to_original(key, stage, gated)!r} has shape {tuple(value.shape)}, but the "
                f"inferred config ({_describe(config, stage)}) needs {expected[key]}."
            )
    unused = sorted(set(source) & set(UNUSED_KEYS[stage]))
    if unused:
        logger.info("Keys the authors' model holds but never uses, not converted: %s", unused)
    if rope_tables:
        logger.info("%d saved rotary tables match the recomputed ones; dropped (rebuilt per forward).",
                    len(rope_tables))  # fmt: skip
    return config, converted


def _check_rope_tables(tables, config):
    """Saved EVA-02 rotary tables must equal the ones the converted model computes at its training grid: a mismatch
    means a wrong patch size, grid or frequency assumption, and the converted model would compute something else."""
    if not tables:
        return
    if not config.use_rope:
        raise ValueError(
            f"The checkpoint holds rotary tables ({sorted(tables)[0]}, ...) but its blocks are not EVA-02's (no "
            f"packed mlp.w12 or attn.q_bias): this layout is not one of the authors' step-2 encoders."
        )
    cos, sin = build_2d_rope(config.image_grid, config.head_dim, config.rope_theta, config.rope_reference_grid)
    for key, table in sorted(tables.items()):
        recomputed = cos if key.endswith("cos") else sin
        if tuple(table.shape) != tuple(recomputed.shape):
            raise ValueError(
                f"Rotary table {key!r} has shape {tuple(table.shape)}, but the training grid {config.image_grid} "
                f"with head dimension {config.head_dim} gives {tuple(recomputed.shape)}; check image_size."
            )
        difference = (table.float() - recomputed).abs().max().item()
        if difference > ROPE_TOLERANCE:
            raise ValueError(
                f"Rotary table {key!r} differs from the recomputed 2-D RoPE table (grid {config.image_grid}, theta "
                f"{config.rope_theta}, reference grid {config.rope_reference_grid}) by up to {difference:.3g}: the "
                f"converted model would rotate queries and keys differently from the source model. Check that the "
                f"checkpoint is an authors' EVA-02-S segmenter trained at this crop size."
            )


def _check_reductions(config, source, stage):
    """`int(K / r)`-style widths are not always reproduced by `K // r'`; fail loudly rather than mis-shape."""
    if stage != "cam":
        return
    channels = config.num_hidden_layers * config.num_attention_heads
    head_out = source["adaptive_attention_fusion.attn_head_ffn.0.weight"].shape[0]
    feat_out = source["adaptive_attention_fusion.attn_feat_ffn.0.weight"].shape[0]
    if channels // config.aaf_reduction != head_out or config.head_dim // config.aaf_feat_reduction != feat_out:
        raise ValueError(
            f"The fusion's bottlenecks ({channels} -> {head_out}, {config.head_dim} -> {feat_out}) are not an integer "
            f"reduction WeakTrConfig can express (aaf_reduction, aaf_feat_reduction)."
        )


def _empty_model(config, stage):
    """The weaktr-hf model for `config` with its random initialisation skipped (every weight is loaded after)."""
    with no_init_weights():
        return MODEL_CLASSES[stage](config)


def _expected_shapes(config, stage):
    """Key -> shape of the weaktr-hf model for `config`."""
    return {key: tuple(value.shape) for key, value in _empty_model(config, stage).state_dict().items()}


def default_normalization(config):
    """The image statistics of the authors' recipe for this encoder: CLIP for EVA-02, ImageNet otherwise."""
    return "eva02" if config.encoder_variant == "eva02" else "deit"


def released_backbone(config, normalization):
    """Which released step-2 backbone (`BACKBONE_NAMES` key) a converted model is, or None if none is S-sized.

    A plain ViT is DeiT-S or the augreg ViT-S; only the recipe's image statistics (`vit` = 0.5) tell them apart.
    """
    if (config.hidden_size, config.num_hidden_layers) != (384, 12):
        return None
    variant = config.encoder_variant
    if variant == "vit":
        return "vit-s" if normalization == "vit" else "deit-s"
    return f"{variant}-s"


ENCODER_DESCRIPTIONS = {
    "vit": "plain ViT",
    "dinov2": "DINOv2 blocks (LayerScale)",
    "eva02": "EVA-02 blocks (SwiGLU MLP, query/value biases, 2-D RoPE)",
}


def _describe(config, stage):
    text = (
        f"{ENCODER_DESCRIPTIONS[config.encoder_variant]}, width {config.hidden_size}, depth "
        f"{config.num_hidden_layers}, heads {config.num_attention_heads}, patch "
        f"{config.patch_size}, image {config.image_size}, {config.num_labels} classes"
    )
    if stage == "seg":
        text += (
            f", decoder width {config.decoder_hidden_size} depth {config.decoder_num_hidden_layers} heads "
            f"{config.decoder_num_attention_heads}"
        )
    return text


def to_original_state_dict(model_or_state_dict, stage=None):
    """
    weaktr-hf model or state dict -> the authors' key layout (the inverse of `convert_state_dict`).

    Keys the authors' models hold but never use (`UNUSED_KEYS`: the step-1 final norm, the step-2 classifier heads
    and distillation token) are not recreated; the authors load with `strict=False`. For an EVA-02 model the rotary
    tables are written as the authors save them (encoder and every attention layer); from a bare state dict, which
    does not say whether RoPE is on, they are left out (the authors' model rebuilds them). `stage` is read from the
    model class or the keys when not given.
    """
    config = None
    if isinstance(model_or_state_dict, WeakTrPreTrainedModel):
        if stage is None:
            stage = "seg" if isinstance(model_or_state_dict, WeakTrForSemanticSegmentation) else "cam"
        state_dict = model_or_state_dict.state_dict()
        config = model_or_state_dict.config
    else:
        state_dict = model_or_state_dict
        if stage is None:
            stage = "seg" if any(key.startswith("decoder.") for key in state_dict) else "cam"
    _check_stage(stage)
    fc1, fc2 = state_dict.get("weaktr.blocks.0.mlp.fc1.weight"), state_dict.get("weaktr.blocks.0.mlp.fc2.weight")
    gated = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    original = {hf_key_to_original(key, stage, gated): value for key, value in state_dict.items()}
    if stage == "seg" and config is not None and config.use_rope:
        cos, sin = build_2d_rope(config.image_grid, config.head_dim, config.rope_theta, config.rope_reference_grid)
        for prefix in ["encoder."] + [f"encoder.blocks.{i}.attn." for i in range(config.num_hidden_layers)]:
            original[f"{prefix}rope.freqs_cos"], original[f"{prefix}rope.freqs_sin"] = cos, sin
    return original


# ---------------------------------------------------------------------------------------------------------------------
# Saving: model, image processor, model card, Hub upload
# ---------------------------------------------------------------------------------------------------------------------


def build_image_processor(config, stage, normalization=None):
    """The recipe's preprocessing: the image statistics named by `normalization` (`NORMALIZATIONS`; by default the
    encoder's, see `default_normalization`); the training size of step 1, the authors' single-scale evaluation
    geometry for step 2 (`AUTHORS_EVALUATION`)."""
    normalization = normalization or default_normalization(config)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {tuple(NORMALIZATIONS)}, got {normalization!r}.")
    mean, std = NORMALIZATIONS[normalization]
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    if stage == "seg":
        return evaluation_processor(
            patch_size=config.patch_size, image_mean=mean, image_std=std, size=height, **AUTHORS_EVALUATION
        )
    return WeakTrImageProcessor(
        size={"height": height, "width": width}, size_divisor=config.patch_size, image_mean=list(mean),
        image_std=list(std),
    )  # fmt: skip


def render_model_card(config, stage, dataset, source_name, source_sha256, normalization, model_id, notes=()):
    """The model card (README.md text) of a converted checkpoint: metadata from `huggingface_hub.ModelCardData`
    (the authors' MIT licence, the paper's numbers in the `model-index` labelled as reported by the paper), text
    from `model_cards/converted_{stage}.md`.

    `model_id` is what the usage snippet loads (the Hub repository, or the output folder's name).
    """
    dataset_name, dataset_type = DATASET_CARD_NAMES.get(dataset, ("an unidentified dataset", None))
    results = REPORTED_RESULTS.get((stage, dataset))
    metrics = []
    if results and stage == "seg":
        backbone = released_backbone(config, normalization)
        if backbone is None:
            reported = "- The encoder is none of the released S-sized backbones, so no reported number applies."
        else:
            reported = (
                f"- {dataset_name} val mIoU, WeakTr with {BACKBONE_NAMES[backbone]}: **{results[backbone]}%** (the "
                f"paper's / authors' README number for this released checkpoint)"
            )
            metrics.append((f"val mIoU reported by the paper ({BACKBONE_NAMES[backbone]}, multi-scale + CRF)",
                            float(results[backbone]), dataset_name, dataset_type, "val"))  # fmt: skip
    elif results:
        reported = "\n".join(f"- {line}" for line in results)
        metrics.append(("pseudo-label mIoU reported by the paper (multi-scale CAMs + CRF)", REPORTED_CAM_MIOU[dataset],
                        dataset_name, dataset_type, "train"))  # fmt: skip
    else:
        reported = "- The class count matches no dataset the paper reports on, so no reported number applies."
    labels = ", ".join(f"{i}: {name}" for i, name in sorted(config.id2label.items()))
    text = hub.render_model_card(
        f"converted_{stage}",
        dataset_name=dataset_name,
        source_name=source_name,
        source_sha256=source_sha256,
        paper=PAPER,
        reported_results=reported,
        architecture=_describe(config, stage),
        num_labels=config.num_labels,
        labels=labels,
        image_size=config.image_size,
        normalization=normalization,
        image_mean=list(NORMALIZATIONS[normalization][0]),
        image_std=list(NORMALIZATIONS[normalization][1]),
        aaf_pooling=config.aaf_pooling,
        model_id=model_id,
        notes="\n".join(f"- {note}" for note in notes) if notes else "- None.",
        install=hub.INSTALL_COMMAND,
        citation=hub.CITATION,
        dataset=dataset or "voc12",
        aux_weight=config.auxiliary_ensemble_weight,
        **AUTHORS_EVALUATION,
    )
    card = hub.model_card(
        text, "image-segmentation" if stage == "seg" else "image-classification", license=hub.CONVERTED_LICENSE,
        metrics=metrics, model_name=model_id, extra_tags=["converted", dataset],
        reported_by=("WeakTr paper (Zhu et al., arXiv 2304.01184) and the authors' README", hub.PAPER_URL),
    )  # fmt: skip
    return str(card)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(checkpoint_path, stage, output_dir, dataset=None, normalization=None, push_to_hub=False,
                       hub_model_id=None, hub_token=None, **config_overrides):  # fmt: skip
    """
    Convert an authors' checkpoint file and save model, image processor and model card to `output_dir`; with
    `push_to_hub`, upload the folder to the Hub repository `hub_model_id` (default: the output folder's name), which
    is checked (token, repository) before anything is converted. Returns the loaded weaktr-hf model (eval mode).

    `normalization` names the processor's image statistics (`NORMALIZATIONS`); by default the encoder's recipe
    (CLIP for EVA-02-S, ImageNet otherwise). The augreg ViT-S checkpoints need `"vit"`: their keys are a DeiT's.
    """
    _check_stage(stage)
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {tuple(NORMALIZATIONS)}, got {normalization!r}.")
    repo_id = None
    if push_to_hub:
        repo_id = hub.prepare_hub_repos(hub_model_id or Path(output_dir).name, token=hub_token)[0]
    if stage == "seg":
        config_overrides.setdefault("auxiliary_ensemble_weight", AUTHORS_AUXILIARY_ENSEMBLE_WEIGHT)
    source = unwrap_state_dict(load_original_checkpoint(checkpoint_path))
    config, state_dict = convert_state_dict(source, stage, dataset=dataset, **config_overrides)
    recipe_normalization = default_normalization(config)
    normalization = normalization or recipe_normalization
    # Only EVA-02-S was trained on CLIP statistics; ImageNet vs 0.5 (DeiT-S vs ViT-S) cannot be checked from keys.
    mismatch = (normalization == "eva02") != (recipe_normalization == "eva02")
    if mismatch:
        logger.warning("Image statistics %r differ from the authors' recipe for this encoder (%r).", normalization,
                       recipe_normalization)  # fmt: skip
    card_dataset = dataset or (infer_dataset(stage, config.num_labels) if "id2label" not in config_overrides else None)

    model = _empty_model(config, stage)
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    notes = []
    unused = sorted(set(source) & set(UNUSED_KEYS[stage]))
    if unused:
        notes.append(f"Keys held but never used by the authors' model, not converted: {', '.join(unused)}.")
    if "encoder.dist_token" in source:
        notes.append(
            "The source encoder had a DeiT distillation token, which was dropped (with its position row); in the "
            "authors' model it took part in self-attention, so outputs differ from the source model's."
        )
    if mismatch:
        notes.append(
            f"Image statistics '{normalization}' were requested; the authors' recipe for this encoder uses "
            f"'{recipe_normalization}'."
        )
    if stage == "cam" and "aaf_pooling" not in config_overrides:
        notes.append("Fusion pooling cannot be read from the weights; 'max' (the released runs) was assumed.")
    if stage == "seg":
        for field, what in (("num_attention_heads", "Encoder"), ("decoder_num_attention_heads", "Decoder")):
            if field not in config_overrides:
                notes.append(
                    f"{what} attention heads cannot be read from the weights; {getattr(config, field)} (width / 64, "
                    f"as in the authors' configs) was assumed."
                )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    build_image_processor(config, stage, normalization).save_pretrained(output_dir)
    card = render_model_card(
        config, stage, card_dataset, Path(checkpoint_path).name, _sha256(checkpoint_path), normalization,
        repo_id or output_dir.name, notes,
    )  # fmt: skip
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    logger.info("Saved %s (%s) to %s", type(model).__name__, _describe(config, stage), output_dir)

    if repo_id:
        hub.push_folder_to_hub(
            str(output_dir), repo_id, token=hub_token,
            commit_message=f"Convert WeakTr step-{1 if stage == 'cam' else 2} checkpoint {Path(checkpoint_path).name}",
        )  # fmt: skip
        logger.info("Uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_path", required=True, help="Authors' .pth checkpoint (or a .safetensors file).")
    parser.add_argument("--stage", required=True, choices=STAGES, help="cam = step 1 (CAM), seg = step 2 (segmenter).")
    parser.add_argument("--output_dir", required=True, help="Folder to write the from_pretrained model to.")
    parser.add_argument(
        "--dataset", choices=DATASETS, default=None,
        help="Class names: voc12 (20 / 21 classes) or coco14 (raw ids 90 / 91, or contiguous 80 / 81). Inferred "
        "from the class count when left out.",
    )  # fmt: skip
    parser.add_argument(
        "--num_attention_heads", type=int, default=None,
        help="Encoder heads. Step 1 reads them from the fusion module (the flag must agree); step 2 defaults to "
        "width / 64.",
    )  # fmt: skip
    parser.add_argument(
        "--decoder_num_attention_heads", type=int, default=None, help="Step-2 decoder heads (default width / 64)."
    )
    parser.add_argument(
        "--aaf_pooling", choices=AAF_POOLINGS, default=None,
        help="Step-1 fusion pooling over tokens (not stored in the weights; the released runs use max).",
    )  # fmt: skip
    parser.add_argument(
        "--normalization", choices=tuple(NORMALIZATIONS), default=None,
        help="Image statistics of the processor: deit (ImageNet mean/std: DeiT-S, DINOv2-S), vit (0.5: the authors' "
        "ViT-S, whose keys look like DeiT-S's, so this flag is needed) or eva02 (CLIP: EVA-02-S). Default: eva02 for "
        "an EVA-02 encoder, deit otherwise.",
    )  # fmt: skip
    parser.add_argument("--push_to_hub", action="store_true",
                        help="Upload the folder to the Hub (--hub_model_id); token and repository are checked first.")
    parser.add_argument("--hub_model_id", help="Hub repository to push to (default: the --output_dir folder's name).")
    parser.add_argument("--hub_token", help="Hub token (default: the one `hf auth login` saved).")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        name: getattr(args, name)
        for name in ("num_attention_heads", "decoder_num_attention_heads", "aaf_pooling")
        if getattr(args, name) is not None
    }
    if args.stage == "cam" and "decoder_num_attention_heads" in overrides:
        raise SystemExit("--decoder_num_attention_heads applies to --stage seg only.")
    if args.stage == "seg" and "aaf_pooling" in overrides:
        raise SystemExit("--aaf_pooling applies to --stage cam only.")
    if args.hub_model_id and not args.push_to_hub:
        raise SystemExit("--hub_model_id names the repository of --push_to_hub; add --push_to_hub to upload.")
    try:
        convert_checkpoint(
            args.checkpoint_path, args.stage, args.output_dir, dataset=args.dataset,
            normalization=args.normalization, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
            hub_token=args.hub_token, **overrides,
        )  # fmt: skip
    except (hub.HubSetupError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"weaktr-convert: error: {error}") from None


def cli(argv=None):
    """The `weaktr-convert` command: exit 0 on success; a user error is one line on stderr and a non-zero exit."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
