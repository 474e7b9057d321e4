"""Tests of the converter for the authors' released checkpoints: key mapping, config inference, error messages,
saved folders, CLI, Hub upload, and numerical parity with a reimplementation of the authors' forward passes.

Checkpoints are built here in the authors' key layout (the dicts their `main.py` and `OnlineRetraining/segm/train.py`
save) with random values, so that nothing is downloaded; the reference forwards below read those keys directly and
follow what the authors' step-1 model (models.py, AAF.py, vision_transformer.py) and step-2 Segmenter
(OnlineRetraining/segm/model) compute.
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

import weaktr_hf.hub
from conftest import authors_rope_table
from weaktr_hf import WeakTrConfig, WeakTrForCAM, WeakTrForSemanticSegmentation, upsample_logits
from weaktr_hf import convert_weaktr_original_to_hf as convert
from weaktr_hf.image_processing_weaktr import WeakTrImageProcessor
from weaktr_hf.inference import segment
from weaktr_hf.labels import BACKGROUND, COCO_CLASSES, COCO_RAW_ID_TO_NAME, VOC_CLASSES

SRC_DIR = Path(convert.__file__).resolve().parents[1]

# Tiny step-1 model: patch 8 on a 4 x 4 grid, width 32, 2 layers x 4 heads (K = 8 maps, head dim 8), 3 classes.
CAM_SHAPES = dict(
    num_classes=3, width=32, depth=2, heads=4, patch=8, grid=4, mlp=64, head_reduction=2, feat_reduction=2
)
# Tiny step-2 model: width 128 (2 heads of 64, as the width / 64 rule infers), decoder 64 wide (1 head), 4 labels.
SEG_SHAPES = dict(num_labels=4, width=128, depth=2, patch=8, grid=4, mlp=256, dec_width=64, dec_depth=2, dec_mlp=128)


def _rand(generator, *shape, scale=None):
    """Trained-like random values: matrices scaled by fan-in, vectors small."""
    scale = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.05)
    return torch.randn(*shape, generator=generator) * scale


def _norm(generator, prefix, width):
    return {f"{prefix}.weight": 1 + _rand(generator, width, scale=0.1), f"{prefix}.bias": _rand(generator, width)}


def _block(generator, prefix, width, mlp, qkv_bias=True):
    """One timm-style pre-norm block in the authors' key names."""
    keys = {**_norm(generator, f"{prefix}.norm1", width), **_norm(generator, f"{prefix}.norm2", width)}
    keys[f"{prefix}.attn.qkv.weight"] = _rand(generator, 3 * width, width)
    if qkv_bias:
        keys[f"{prefix}.attn.qkv.bias"] = _rand(generator, 3 * width)
    keys[f"{prefix}.attn.proj.weight"] = _rand(generator, width, width)
    keys[f"{prefix}.attn.proj.bias"] = _rand(generator, width)
    keys[f"{prefix}.mlp.fc1.weight"] = _rand(generator, mlp, width)
    keys[f"{prefix}.mlp.fc1.bias"] = _rand(generator, mlp)
    keys[f"{prefix}.mlp.fc2.weight"] = _rand(generator, width, mlp)
    keys[f"{prefix}.mlp.fc2.bias"] = _rand(generator, width)
    return keys


def authors_cam_state_dict(num_classes=3, width=32, depth=2, heads=4, patch=8, grid=4, mlp=64, head_reduction=2,
                           feat_reduction=2, seed=0):  # fmt: skip
    """A step-1 state dict in the authors' layout, including their unused final norm."""
    g = torch.Generator().manual_seed(seed)
    channels, head_dim = depth * heads, width // heads
    state = {
        "cls_token": _rand(g, 1, num_classes, width, scale=0.5),
        "pos_embed": _rand(g, 1, num_classes + grid * grid, width, scale=0.5),
        "patch_embed.proj.weight": _rand(g, width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        "patch_embed.proj.bias": _rand(g, width),
        **_norm(g, "norm", width),
        "head.weight": _rand(g, num_classes, width, 3, 3, scale=(9 * width) ** -0.5),
        "head.bias": _rand(g, num_classes),
        "adaptive_attention_fusion.attn_head_ffn.0.weight": _rand(g, channels // head_reduction, channels),
        "adaptive_attention_fusion.attn_head_ffn.2.weight": _rand(g, channels, channels // head_reduction),
        "adaptive_attention_fusion.attn_feat_ffn.0.weight": _rand(g, head_dim // feat_reduction, head_dim),
        "adaptive_attention_fusion.attn_feat_ffn.0.bias": _rand(g, head_dim // feat_reduction),
        "adaptive_attention_fusion.attn_feat_ffn.1.weight": _rand(g, 1, head_dim // feat_reduction),
        "adaptive_attention_fusion.attn_feat_ffn.1.bias": _rand(g, 1),
    }
    for i in range(depth):
        state.update(_block(g, f"blocks.{i}", width, mlp))
    return state


def authors_seg_state_dict(num_labels=4, width=128, depth=2, patch=8, grid=4, mlp=256, dec_width=64, dec_depth=2,
                           dec_mlp=128, distilled=False, imagenet_classes=10, seed=0):  # fmt: skip
    """A step-2 state dict in the authors' layout, with the encoder's unused classifier (and distillation) heads."""
    g = torch.Generator().manual_seed(seed)
    prefix_tokens = 2 if distilled else 1
    state = {
        "encoder.cls_token": _rand(g, 1, 1, width, scale=0.5),
        "encoder.pos_embed": _rand(g, 1, prefix_tokens + grid * grid, width, scale=0.5),
        "encoder.patch_embed.proj.weight": _rand(g, width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        "encoder.patch_embed.proj.bias": _rand(g, width),
        **_norm(g, "encoder.norm", width),
        "encoder.head.weight": _rand(g, imagenet_classes, width),
        "encoder.head.bias": _rand(g, imagenet_classes),
        "decoder.proj_dec.weight": _rand(g, dec_width, width),
        "decoder.proj_dec.bias": _rand(g, dec_width),
        "decoder.cls_emb": _rand(g, 1, num_labels, dec_width, scale=0.5),
        "decoder.proj_patch": _rand(g, dec_width, dec_width),
        "decoder.proj_classes": _rand(g, dec_width, dec_width),
        **_norm(g, "decoder.decoder_norm", dec_width),
        **_norm(g, "decoder.mask_norm", num_labels),
    }
    if distilled:
        state["encoder.dist_token"] = _rand(g, 1, 1, width, scale=0.5)
        state["encoder.head_dist.weight"] = _rand(g, imagenet_classes, width)
        state["encoder.head_dist.bias"] = _rand(g, imagenet_classes)
    for i in range(depth):
        state.update(_block(g, f"encoder.blocks.{i}", width, mlp))
    for i in range(dec_depth):
        state.update(_block(g, f"decoder.blocks.{i}", dec_width, dec_mlp))
    return state


def wrap(state_dict, wrapping):
    """The ways the authors' training scripts store a state dict."""
    if wrapping == "plain":
        return state_dict
    if wrapping == "model":
        return {"model": state_dict, "epoch": 59}
    if wrapping == "model+module":  # saved from a DistributedDataParallel model
        return {"model": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3, "n_cls": 21}
    raise ValueError(wrapping)


# ---------------------------------------------------------------------------------------------------------------------
# Reference forwards: what the authors' models compute, written against their key names
# ---------------------------------------------------------------------------------------------------------------------


def _vit_block(sd, prefix, x, heads, eps):
    """Pre-norm block; returns (output, attention probabilities (B, heads, T, T), attention branch output)."""
    batch, tokens, width = x.shape
    h = F.layer_norm(x, (width,), sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"], eps)
    qkv = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], sd.get(f"{prefix}.attn.qkv.bias"))
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1)
    attended = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
    branch = F.linear(attended, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    x = x + branch
    h = F.layer_norm(x, (width,), sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"])),
                 sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])  # fmt: skip
    return x + h, probs, branch


def reference_cam_forward(sd, pixel_values, heads, pooling="max"):
    """The authors' step-1 forward (eval mode): class-token scores, coarse and fine CAMs."""
    num_classes, width = sd["cls_token"].shape[1:]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    batch, _, height, width_px = pixel_values.shape
    rows, cols = height // patch, width_px // patch
    x = F.conv2d(pixel_values, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    table = sd["pos_embed"]
    side = math.isqrt(table.shape[1] - num_classes)
    if not (rows * cols == side * side and rows == cols):
        # DINO-style resize: bicubic with scale factors (new + 0.1) / old rather than a target size.
        grid = table[:, num_classes:].reshape(1, side, side, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        table = torch.cat([table[:, :num_classes], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, width)], dim=1)
    x = x + table
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    probs, branches = [], []
    for i in range(depth):
        x, p, b = _vit_block(sd, f"blocks.{i}", x, heads, 1e-6)
        probs.append(p)
        branches.append(b)
    # No final norm: the authors' CAM forward never applies it.
    logits = x[:, :num_classes].mean(-1)
    patch_map = x[:, num_classes:].reshape(batch, rows, cols, width).permute(0, 3, 1, 2)
    coarse_cam = F.conv2d(patch_map, sd["head.weight"], sd["head.bias"], padding=1)

    # Adaptive Attention Fusion over K = heads x depth maps, channel k = head * depth + layer. A head's feature is
    # every `heads`-th channel of the attention branch output, starting at the head's index.
    maps, features = [], []
    for head in range(heads):
        for layer in range(depth):
            maps.append(probs[layer][:, head])
            features.append(branches[layer][..., head::heads])
    maps, features = torch.stack(maps, 1), torch.stack(features, 1)  # (B, K, T, T), (B, K, T, head_dim)
    pooled = features.amax(dim=2) if pooling == "max" else features.mean(dim=2)
    fusion = "adaptive_attention_fusion"
    scores = F.linear(pooled, sd[f"{fusion}.attn_feat_ffn.0.weight"], sd[f"{fusion}.attn_feat_ffn.0.bias"])
    scores = F.linear(scores, sd[f"{fusion}.attn_feat_ffn.1.weight"], sd[f"{fusion}.attn_feat_ffn.1.bias"])[..., 0]
    hidden = torch.relu(F.linear(scores, sd[f"{fusion}.attn_head_ffn.0.weight"]))
    weights = torch.sigmoid(F.linear(hidden, sd[f"{fusion}.attn_head_ffn.2.weight"]))
    fused = (maps * weights[:, :, None, None]).mean(1)
    cross = fused[:, :num_classes, num_classes:].reshape(batch, num_classes, rows, cols)
    cams = (cross * torch.relu(coarse_cam)).flatten(2)
    fine_cam = torch.einsum("bij,bcj->bci", fused[:, num_classes:, num_classes:], cams).reshape_as(coarse_cam)
    return {
        "logits": logits,
        "coarse_cam": coarse_cam,
        "coarse_logits": coarse_cam.mean((2, 3)),
        "fine_cam": fine_cam,
        "fine_logits": fine_cam.mean((2, 3)),
        "cross_attention": cross,
    }


def reference_seg_forward(sd, pixel_values, heads, decoder_heads):
    """The authors' step-2 Segmenter forward (eval mode): (patch-level masks, masks at the input size)."""
    width = sd["encoder.cls_token"].shape[-1]
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    num_labels = sd["decoder.cls_emb"].shape[1]
    batch, _, height, width_px = pixel_values.shape
    padded = F.pad(pixel_values, (0, (-width_px) % patch, 0, (-height) % patch))
    rows, cols = padded.shape[-2] // patch, padded.shape[-1] // patch
    x = F.conv2d(padded, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=patch)
    prefix = [sd["encoder.cls_token"]] + ([sd["encoder.dist_token"]] if "encoder.dist_token" in sd else [])
    x = torch.cat([p.expand(batch, -1, -1) for p in prefix] + [x.flatten(2).transpose(1, 2)], dim=1)
    table = sd["encoder.pos_embed"]
    if x.shape[1] != table.shape[1]:
        side = math.isqrt(table.shape[1] - len(prefix))
        grid = table[:, len(prefix) :].reshape(1, side, side, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bilinear")
        table = torch.cat([table[:, : len(prefix)], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, width)], dim=1)
    x = x + table
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    for i in range(depth):
        x = _vit_block(sd, f"encoder.blocks.{i}", x, heads, 1e-5)[0]
    x = F.layer_norm(x, (width,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], 1e-5)[:, len(prefix) :]

    y = F.linear(x, sd["decoder.proj_dec.weight"], sd["decoder.proj_dec.bias"])
    y = torch.cat([y, sd["decoder.cls_emb"].expand(batch, -1, -1)], dim=1)
    dec_depth = len({k.split(".")[2] for k in sd if k.startswith("decoder.blocks.")})
    for i in range(dec_depth):
        y = _vit_block(sd, f"decoder.blocks.{i}", y, decoder_heads, 1e-5)[0]
    y = F.layer_norm(y, (y.shape[-1],), sd["decoder.decoder_norm.weight"], sd["decoder.decoder_norm.bias"], 1e-5)
    patches = y[:, :-num_labels] @ sd["decoder.proj_patch"]
    classes = y[:, -num_labels:] @ sd["decoder.proj_classes"]
    patches, classes = patches / patches.norm(dim=-1, keepdim=True), classes / classes.norm(dim=-1, keepdim=True)
    masks = patches @ classes.transpose(1, 2)
    masks = F.layer_norm(masks, (num_labels,), sd["decoder.mask_norm.weight"], sd["decoder.mask_norm.bias"], 1e-5)
    masks = masks.transpose(1, 2).reshape(batch, num_labels, rows, cols)
    full = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear")[..., :height, :width_px]
    return masks, full


def _converted_model(state_dict, stage, **overrides):
    config, converted = convert.convert_state_dict(state_dict, stage, **overrides)
    model = convert.MODEL_CLASSES[stage](config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Key mapping and config inference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapping", ["plain", "model", "model+module"])
def test_cam_checkpoint_converts_every_key_and_round_trips(tmp_path, wrapping):
    source = authors_cam_state_dict(**CAM_SHAPES)
    path = tmp_path / "cam.pth"
    torch.save(wrap(source, wrapping), path)

    config, converted = convert.convert_state_dict(convert.load_original_checkpoint(path), "cam")

    assert (config.num_labels, config.hidden_size, config.num_hidden_layers) == (3, 32, 2)
    assert (config.num_attention_heads, config.patch_size, config.image_size) == (4, 8, 32)
    assert (config.intermediate_size, config.aaf_reduction, config.aaf_feat_reduction) == (64, 2, 2)
    assert config.layer_norm_eps == 1e-6 and config.qkv_bias and config.aaf_pooling == "max"
    assert set(converted) == set(WeakTrForCAM(config).state_dict())
    back = convert.to_original_state_dict(converted, "cam")
    assert set(back) == set(source) - {"norm.weight", "norm.bias"}
    for key, value in back.items():
        assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("wrapping", ["plain", "model", "model+module"])
def test_seg_checkpoint_converts_every_key_and_round_trips(tmp_path, wrapping):
    source = authors_seg_state_dict(**SEG_SHAPES)
    path = tmp_path / "seg.pth"
    torch.save(wrap(source, wrapping), path)

    config, converted = convert.convert_state_dict(convert.load_original_checkpoint(path), "seg")

    assert (config.num_labels, config.hidden_size, config.num_hidden_layers) == (4, 128, 2)
    assert config.num_attention_heads == 2  # width 128 / 64
    assert (config.patch_size, config.image_size, config.intermediate_size, config.layer_norm_eps) == (8, 32, 256, 1e-5)
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers) == (64, 2)
    assert (config.decoder_intermediate_size, config.decoder_num_attention_heads) == (128, 1)
    assert set(converted) == set(WeakTrForSemanticSegmentation(config).state_dict())
    back = convert.to_original_state_dict(converted, "seg")
    assert set(back) == set(source) - {"encoder.head.weight", "encoder.head.bias"}
    for key, value in back.items():
        assert torch.equal(value, source[key]), key


def test_seg_distillation_token_is_dropped_with_its_position_row(caplog):
    source = authors_seg_state_dict(**SEG_SHAPES, distilled=True)
    assert source["encoder.pos_embed"].shape[1] == 2 + 16

    with caplog.at_level(logging.WARNING, logger=convert.__name__):
        config, converted = convert.convert_state_dict(wrap(source, "model"), "seg")

    assert config.image_size == 32  # 16 patch rows once the two prefix rows are set apart
    expected_table = torch.cat([source["encoder.pos_embed"][:, :1], source["encoder.pos_embed"][:, 2:]], dim=1)
    assert torch.equal(converted["weaktr.pos_embed"], expected_table)
    assert not any("dist" in key for key in converted)
    assert "distillation token" in caplog.text and "differ" in caplog.text


def test_to_original_state_dict_reads_stage_from_the_model():
    config, converted = convert.convert_state_dict(authors_seg_state_dict(**SEG_SHAPES), "seg")
    model = WeakTrForSemanticSegmentation(config)
    model.load_state_dict(converted)
    back = convert.to_original_state_dict(model)
    assert "encoder.cls_token" in back and "decoder.cls_emb" in back
    assert torch.equal(back["encoder.blocks.1.mlp.fc2.weight"], converted["weaktr.blocks.1.mlp.fc2.weight"])


def test_step1_heads_come_from_the_fusion_module_and_must_agree():
    source = authors_cam_state_dict(**{**CAM_SHAPES, "heads": 2})  # K = 2 layers x 2 heads
    config, _ = convert.convert_state_dict(source, "cam")
    assert config.num_attention_heads == 2 and config.head_dim == 16
    with pytest.raises(ValueError, match=r"num_attention_heads=4 disagrees.*4 attention maps = 2 layers x 2 heads"):
        convert.convert_state_dict(source, "cam", num_attention_heads=4)


def test_step2_heads_default_to_width_over_64_and_can_be_overridden():
    source = authors_seg_state_dict(**SEG_SHAPES)
    config, _ = convert.convert_state_dict(source, "seg", num_attention_heads=4, decoder_num_attention_heads=2)
    assert (config.num_attention_heads, config.decoder_num_attention_heads) == (4, 2)
    narrow = authors_seg_state_dict(**{**SEG_SHAPES, "width": 96})
    with pytest.raises(ValueError, match="--num_attention_heads"):
        convert.convert_state_dict(narrow, "seg")


def test_unknown_key_fails_naming_the_key():
    cam = authors_cam_state_dict(**CAM_SHAPES)
    cam["blocks.0.attn.extra_scale"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.attn\.extra_scale'\]"):
        convert.convert_state_dict(cam, "cam")
    seg = authors_seg_state_dict(**SEG_SHAPES)
    seg["decoder.cls_head.weight"] = torch.ones(4, 64)
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder\.cls_head\.weight'\]"):
        convert.convert_state_dict(seg, "seg")


def test_missing_key_fails_naming_the_key():
    cam = authors_cam_state_dict(**CAM_SHAPES)
    del cam["blocks.1.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.attn\.proj\.bias'\]"):
        convert.convert_state_dict(cam, "cam")
    seg = authors_seg_state_dict(**SEG_SHAPES)
    del seg["decoder.mask_norm.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['decoder\.mask_norm\.bias'\]"):
        convert.convert_state_dict(seg, "seg")


def test_shape_mismatch_fails_naming_the_key():
    seg = authors_seg_state_dict(**SEG_SHAPES)
    seg["decoder.mask_norm.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"'decoder\.mask_norm\.weight' has shape \(5,\).*needs \(4,\)"):
        convert.convert_state_dict(seg, "seg")


def test_wrong_stage_and_unsupported_variants_get_a_hint():
    with pytest.raises(ValueError, match="use stage 'seg'"):
        convert.convert_state_dict(authors_seg_state_dict(**SEG_SHAPES), "cam")
    with pytest.raises(ValueError, match="use stage 'cam'"):
        convert.convert_state_dict(authors_cam_state_dict(**CAM_SHAPES), "seg")
    linear_decoder = authors_seg_state_dict(**SEG_SHAPES)
    linear_decoder["decoder.head.weight"] = torch.ones(4, 64)
    with pytest.raises(ValueError, match=r"'decoder\.head\.weight'.*linear decoder"):
        convert.convert_state_dict(linear_decoder, "seg")


@pytest.mark.parametrize(
    "stage, count, dataset, expected",
    [
        ("cam", 20, None, dict(enumerate(VOC_CLASSES))),
        ("seg", 21, "voc12", {0: BACKGROUND, **{i + 1: n for i, n in enumerate(VOC_CLASSES)}}),
        ("cam", 90, None, {raw - 1: name for raw, name in COCO_RAW_ID_TO_NAME.items()}),
        ("seg", 91, "coco14", {0: BACKGROUND, **COCO_RAW_ID_TO_NAME}),
        ("seg", 81, None, {0: BACKGROUND, **{i + 1: n for i, n in enumerate(COCO_CLASSES)}}),
        ("cam", 5, None, {i: f"class_{i}" for i in range(5)}),
        ("seg", 3, None, {0: BACKGROUND, 1: "class_1", 2: "class_2"}),
    ],
)
def test_class_names_follow_dataset_or_class_count(stage, count, dataset, expected):
    assert convert.resolve_id2label(stage, count, dataset) == expected


def test_coco_step1_checkpoint_gets_raw_id_names():
    config, _ = convert.convert_state_dict(authors_cam_state_dict(**{**CAM_SHAPES, "num_classes": 90}), "cam")
    assert config.num_labels == 90
    assert (config.id2label[0], config.id2label[11], config.id2label[89]) == ("person", "street sign", "toothbrush")


def test_dataset_that_does_not_match_the_class_count_is_an_error():
    with pytest.raises(ValueError, match=r"4 classes, but a step-2 voc12 model has 21"):
        convert.convert_state_dict(authors_seg_state_dict(**SEG_SHAPES), "seg", dataset="voc12")


def test_checkpoint_needing_code_unpickling_is_refused(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": authors_cam_state_dict(**CAM_SHAPES), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*argparse\.Namespace.*re-save its weights") as error:
        convert.load_original_checkpoint(path)
    assert "torch.save(c.get('model', c)" in str(error.value)


def test_numpy_scalars_in_a_checkpoint_are_read_without_unpickling_code(tmp_path):
    path = tmp_path / "with_miou.pth"
    source = authors_seg_state_dict(**SEG_SHAPES)
    torch.save({"model": source, "miou": np.float64(74.0), "epoch": 99}, path)
    checkpoint = convert.load_original_checkpoint(path)
    assert float(checkpoint["miou"]) == 74.0
    assert set(convert.unwrap_state_dict(checkpoint)) == set(source)


def test_safetensors_file_is_read_too(tmp_path):
    from safetensors.torch import save_file

    source = authors_cam_state_dict(**CAM_SHAPES)
    save_file(source, tmp_path / "cam.safetensors")
    loaded = convert.load_original_checkpoint(tmp_path / "cam.safetensors")
    config, converted = convert.convert_state_dict(loaded, "cam")
    assert torch.equal(converted["weaktr.pos_embed"], source["pos_embed"]) and config.num_labels == 3


def test_missing_checkpoint_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_file.pth"):
        convert.load_original_checkpoint("no_such_file.pth")


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the authors' forward passes
# ---------------------------------------------------------------------------------------------------------------------


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("size", [(32, 32), (48, 48), (40, 24)])  # training grid, larger, non-square
def test_cam_outputs_match_the_authors_forward(pooling, size):
    source = authors_cam_state_dict(**CAM_SHAPES, seed=1)
    model = _converted_model(wrap(source, "model+module"), "cam", aaf_pooling=pooling)
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        outputs = model(pixel_values)
        reference = reference_cam_forward(source, pixel_values, heads=4, pooling=pooling)

    for name, expected in reference.items():
        assert max_abs_diff(getattr(outputs, name), expected) < 1e-4, name
        # Fine CAMs and fused attention are small numbers (means of probabilities), so also compare relatively.
        torch.testing.assert_close(getattr(outputs, name), expected, rtol=1e-4, atol=1e-6, msg=name)
    # The comparison can fail: the other pooling moves the fine CAM far beyond the tolerance.
    other = reference_cam_forward(source, pixel_values, heads=4, pooling="avg" if pooling == "max" else "max")
    assert max_abs_diff(other["fine_cam"], reference["fine_cam"]) > 1e-5


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (30, 45)])  # training grid, non-square, padded to the patch
def test_seg_logits_match_the_authors_forward(size):
    source = authors_seg_state_dict(**SEG_SHAPES, seed=1)
    model = _converted_model(wrap(source, "model"), "seg")
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        logits = model(pixel_values).logits
        reference_masks, reference_full = reference_seg_forward(source, pixel_values, heads=2, decoder_heads=1)

    assert logits.shape == reference_masks.shape
    assert max_abs_diff(logits, reference_masks) < 1e-4
    assert max_abs_diff(upsample_logits(logits, size, 8), reference_full) < 1e-4
    assert reference_masks.std() > 0.1  # LayerNorm'd over classes: O(1) values, so 1e-4 is a tight bound


def test_seg_distilled_checkpoint_is_not_claimed_to_match():
    """A distillation token attends with the patches in the authors' model, so dropping it changes outputs; the
    converter says so (see the warning test) and this pins that the difference is real, not hidden."""
    source = authors_seg_state_dict(**SEG_SHAPES, distilled=True, seed=1)
    model = _converted_model(source, "seg")
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference_masks, _ = reference_seg_forward(source, pixel_values, heads=2, decoder_heads=1)
        assert max_abs_diff(model(pixel_values).logits, reference_masks) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Saved folders, CLI and Hub upload
# ---------------------------------------------------------------------------------------------------------------------


def _read_front_matter(card):
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def test_converted_cam_folder_loads_with_processor_and_card(tmp_path):
    source = authors_cam_state_dict(**{**CAM_SHAPES, "num_classes": 20})
    checkpoint = tmp_path / "WeakTr_VOC_CAM.pth"
    torch.save(wrap(source, "model"), checkpoint)

    converted = convert.convert_checkpoint(checkpoint, "cam", tmp_path / "out")

    model, info = WeakTrForCAM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.id2label[0] == "aeroplane" and model.config.num_labels == 20
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values).fine_cam, converted(pixel_values).fine_cam)
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key
    processor = WeakTrImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"height": 32, "width": 32} and processor.size_divisor == 8
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]
    card = (tmp_path / "out" / "README.md").read_text()
    front = _read_front_matter(card)
    assert "library_name: transformers" in front and "pipeline_tag: image-classification" in front
    assert "license: mit" in front and "- voc12" in front and "- weaktr" in front and "arxiv:2304.01184" in front
    # "pascal-voc-2012" is no Hub dataset id: no `datasets`; the paper's number is in the model-index, as the paper's.
    assert "datasets:" not in front
    results = ModelCard(card).data.eval_results
    assert [result.metric_value for result in results] == [69.4] and "paper" in results[0].source_name
    assert "Reported in the paper, not measured by this conversion" in card and "69.4%" in card
    assert "WeakTr_VOC_CAM.pth" in card and "norm.weight" in card and "$" not in card


def test_converted_seg_folder_loads_with_processor_and_card(tmp_path):
    source = authors_seg_state_dict(**{**SEG_SHAPES, "num_labels": 21})
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(wrap(source, "model+module"), checkpoint)

    convert.convert_checkpoint(checkpoint, "seg", tmp_path / "out", dataset="voc12", normalization="vit")

    model, info = WeakTrForSemanticSegmentation.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.id2label[0] == BACKGROUND and model.config.id2label[20] == "tvmonitor"
    assert model.config.layer_norm_eps == 1e-5
    processor = WeakTrImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"height": 32, "width": 32} and list(processor.image_mean) == [0.5, 0.5, 0.5]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in _read_front_matter(card)
    assert "not measured by this conversion" in card and "$" not in card
    # A 128-wide, 2-layer encoder is none of the released S-sized backbones: no paper number is claimed for it.
    assert "none of the released S-sized backbones" in card and "%" not in card.split("## Results")[1].split("##")[0]


def test_card_without_known_dataset_claims_no_reported_number(tmp_path):
    checkpoint = tmp_path / "cam.pth"
    torch.save(authors_cam_state_dict(**CAM_SHAPES), checkpoint)
    convert.convert_checkpoint(checkpoint, "cam", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "%" not in card.split("## Results")[1].split("## Conversion notes")[0]
    assert "datasets:" not in _read_front_matter(card)


def test_cli_converts_a_checkpoint_end_to_end(tmp_path):
    checkpoint = tmp_path / "seg.pth"
    torch.save(wrap(authors_seg_state_dict(**SEG_SHAPES), "model"), checkpoint)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, "-m", "weaktr_hf.convert_weaktr_original_to_hf", "--checkpoint_path", str(checkpoint),
        "--stage", "seg", "--output_dir", str(tmp_path / "out"), "--decoder_num_attention_heads", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decoder_num_attention_heads"] == 2 and config["num_attention_heads"] == 2
    assert config["id2label"]["0"] == BACKGROUND
    assert {"model.safetensors", "preprocessor_config.json", "README.md"} <= set(os.listdir(tmp_path / "out"))


def test_cli_rejects_a_flag_of_the_other_stage(tmp_path):
    with pytest.raises(SystemExit, match="--aaf_pooling applies to --stage cam only"):
        convert.main([
            "--checkpoint_path", "x.pth", "--stage", "seg", "--output_dir", str(tmp_path), "--aaf_pooling", "avg",
        ])  # fmt: skip


def test_push_to_hub_uploads_the_output_folder(tmp_path, monkeypatch):
    calls = []

    class RecordingHfApi:
        def __init__(self, token=None):
            pass

        def whoami(self, token=None):
            calls.append(("whoami",))
            return {"name": "someone"}

        def create_repo(self, repo_id, exist_ok=False, **kwargs):
            calls.append(("create_repo", repo_id, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), kwargs.get("commit_message")))

    monkeypatch.setattr(weaktr_hf.hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    checkpoint = tmp_path / "cam.pth"
    torch.save(wrap(authors_cam_state_dict(**CAM_SHAPES), "model"), checkpoint)

    convert.main([
        "--checkpoint_path", str(checkpoint), "--stage", "cam", "--output_dir", str(tmp_path / "out"),
        "--push_to_hub", "--hub_model_id", "someone/weaktr-cam",
    ])  # fmt: skip

    # The repository is checked and created before anything is converted, as the training script does.
    assert calls[:2] == [("whoami",), ("create_repo", "someone/weaktr-cam", True)]
    name, repo_id, files, message = calls[-1]
    assert (name, repo_id) == ("upload_folder", "someone/weaktr-cam")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert "cam.pth" in message
    assert 'from_pretrained("someone/weaktr-cam", trust_remote_code=True)' in (tmp_path / "out" / "README.md").read_text()


def test_push_to_hub_offline_stops_before_converting_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    checkpoint = tmp_path / "cam.pth"
    torch.save(wrap(authors_cam_state_dict(**CAM_SHAPES), "model"), checkpoint)
    with pytest.raises(SystemExit) as exited:
        convert.main(["--checkpoint_path", str(checkpoint), "--stage", "cam", "--output_dir", str(tmp_path / "out"),
                      "--push_to_hub", "--hub_model_id", "someone/weaktr-cam"])  # fmt: skip
    message = str(exited.value.code)
    assert "offline" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2-S and EVA-02-S step-2 checkpoints (the authors' Segmenter key layout)
# ---------------------------------------------------------------------------------------------------------------------


def timm_variant_encoder(variant, seed=0):
    """A tiny timm encoder configured like the authors' step-2 DINOv2 / EVA-02 (patch 8, 4 x 4 grid, width 128 with
    2 heads of 64, eps 1e-5, final norm on all tokens), with random non-default weights."""
    import timm

    common = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0,
                  norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))  # fmt: skip
    torch.manual_seed(seed)
    if variant == "dinov2":
        model = timm.create_model("vit_small_patch14_dinov2", **common)
    else:
        model = timm.create_model("eva02_small_patch14_224", mlp_ratio=2.0, global_pool="token", use_fc_norm=False,
                                  **common)  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def authors_variant_state_dict(variant, encoder, num_labels=4):
    """The authors' step-2 Segmenter state dict for `encoder`'s weights: their key names (`mlp.w12` / `mlp.w3` for
    EVA-02), the unused 1000-way head, EVA-02's rotary buffers saved for the encoder and again in every attention
    layer, and a mask-transformer decoder."""
    decoder = {k: v for k, v in authors_seg_state_dict(**{**SEG_SHAPES, "num_labels": num_labels}).items()
               if k.startswith("decoder.")}  # fmt: skip
    state = {"encoder.head.weight": torch.randn(1000, 128), "encoder.head.bias": torch.randn(1000), **decoder}
    for key, value in encoder.state_dict().items():
        if variant == "eva02":
            key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        state["encoder." + key] = value.clone()
    if variant == "eva02":
        cos, sin = authors_rope_table(4, 64)
        for prefix in ["encoder."] + [f"encoder.blocks.{i}.attn." for i in range(2)]:
            state[f"{prefix}rope.freqs_cos"], state[f"{prefix}rope.freqs_sin"] = cos.clone(), sin.clone()
    return state


@pytest.mark.parametrize("variant", ["dinov2", "eva02"])
def test_variant_checkpoint_converts_every_key_and_matches_timm(variant):
    encoder = timm_variant_encoder(variant)
    source = authors_variant_state_dict(variant, encoder)

    config, converted = convert.convert_state_dict(wrap(source, "model+module"), "seg")

    eva = variant == "eva02"
    assert (config.use_rope, config.use_gated_mlp, config.key_bias) == (eva, eva, not eva)
    assert config.layerscale_value == (None if eva else 1.0)
    assert config.intermediate_size == (256 if eva else 512) and config.hidden_act == ("silu" if eva else "gelu")
    assert config.layer_norm_eps == 1e-5 and config.num_attention_heads == 2
    assert set(converted) == set(WeakTrForSemanticSegmentation(config).state_dict())
    model = _converted_model(source, "seg")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = encoder.forward_features(pixel_values)
        assert max_abs_diff(model.weaktr(pixel_values).last_hidden_state, reference) < 1e-5
        torch.testing.assert_close(model(pixel_values).logits, model.decoder(reference[:, 1:], (4, 4))[0],
                                   rtol=0, atol=1e-5)  # fmt: skip

    back = convert.to_original_state_dict(model)
    assert set(back) == set(source) - {"encoder.head.weight", "encoder.head.bias"}
    for key, value in back.items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=1e-6, msg=key)


def test_eva_rope_table_that_disagrees_is_refused():
    source = authors_variant_state_dict("eva02", timm_variant_encoder("eva02"))
    cos, sin = authors_rope_table(4, 64, reference_grid=14)  # another pretraining grid
    source["encoder.blocks.1.attn.rope.freqs_sin"] = sin
    with pytest.raises(ValueError, match=r"'encoder\.blocks\.1\.attn\.rope\.freqs_sin' differs from the recomputed"):
        convert.convert_state_dict(source, "seg")
    source["encoder.blocks.1.attn.rope.freqs_sin"] = authors_rope_table(5, 64)[1]  # a 5 x 5 grid's table
    with pytest.raises(ValueError, match=r"has shape \(25, 64\).*gives \(16, 64\)"):
        convert.convert_state_dict(source, "seg")


def test_converted_eva_folder_runs_in_the_pipeline_with_clip_statistics(tmp_path):
    from PIL import Image
    from transformers import pipeline

    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(wrap(authors_variant_state_dict("eva02", timm_variant_encoder("eva02"), num_labels=21), "model"),
               checkpoint)  # fmt: skip
    converted = convert.convert_checkpoint(checkpoint, "seg", tmp_path / "out", dataset="voc12")

    model, info = WeakTrForSemanticSegmentation.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.use_rope and model.config.use_gated_mlp and not model.config.key_bias
    processor = WeakTrImageProcessor.from_pretrained(tmp_path / "out")
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(processor.image_std) == [0.26862954, 0.26130258, 0.27577711]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    # The authors' single-scale evaluation: short side 520, 480-px windows every 320 px, the 0.8 decoder ensemble.
    assert (processor.base_size, processor.min_size, processor.window_size, processor.window_stride) == (520, 480,
                                                                                                        480, 320)
    assert model.config.auxiliary_ensemble_weight == 0.8
    segments = pipeline("image-segmentation", model=str(tmp_path / "out"))(image)
    native = WeakTrImageProcessor(do_resize=False, image_mean=processor.image_mean, image_std=processor.image_std)
    expected = segment(converted, native(image, return_tensors="pt").pixel_values, 480, 320, base_size=520,
                       min_size=480)[0].argmax(0)  # fmt: skip
    predicted = torch.full((40, 56), -1)
    for item in segments:
        predicted[torch.from_numpy(np.array(item["mask"]) > 0)] = model.config.label2id[item["label"]]
    # Where windows overlap (a third of this pass) the pipeline averages the ensemble's log-probabilities and the
    # eval stage each head's logits: on random weights, whose classes are near ties, 98.4% of pixels agree.
    assert (predicted == expected).float().mean() >= 0.97
    card = (tmp_path / "out" / "README.md").read_text()
    assert "EVA-02 blocks" in card and "eva02" in card


S_SIZED = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=480, layer_norm_eps=1e-5)
VARIANT_CONFIGS = {
    "deit-s": {}, "vit-s": {}, "dinov2-s": {"layerscale_value": 1.0},
    "eva02-s": {"use_gated_mlp": True, "intermediate_size": 1024, "hidden_act": "silu", "key_bias": False,
                "use_rope": True},
}  # fmt: skip


@pytest.mark.parametrize(
    "backbone, dataset, number",
    [("deit-s", "voc12", "74.0"), ("vit-s", "voc12", "78.4"), ("dinov2-s", "voc12", "75.8"),
     ("eva02-s", "voc12", "78.5"), ("deit-s", "coco14", "46.9"), ("vit-s", "coco14", "50.3"),
     ("dinov2-s", "coco14", "48.9"), ("eva02-s", "coco14", "51.1")],
)  # fmt: skip
def test_card_gives_the_papers_number_of_the_released_backbone(backbone, dataset, number):
    num_labels = 21 if dataset == "voc12" else 91
    config = WeakTrConfig(**S_SIZED, **VARIANT_CONFIGS[backbone], num_labels=num_labels)
    normalization = "vit" if backbone == "vit-s" else convert.default_normalization(config)
    assert convert.released_backbone(config, normalization) == backbone
    card = convert.render_model_card(config, "seg", dataset, "checkpoint.pth", "0" * 64, normalization, "out")
    results = card.split("## Results")[1].split("## Conversion notes")[0]
    assert f"**{number}%**" in results and convert.BACKBONE_NAMES[backbone] in results
    assert results.count("%**") == 1 and "paper" in results
