"""`load_timm_backbone`: parity with timm's ViT, class-token repetition, position-table resizing, error reports.

timm models are built with `pretrained=False` (no network here); their weights are perturbed so that every copied
tensor matters for the comparison.
"""

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F

from weaktr_hf import (
    BackboneLoadingReport,
    WeakTrConfig,
    WeakTrForCAM,
    WeakTrForSemanticSegmentation,
    load_timm_backbone,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# deit_small_patch16_224 at depth 2 (the decoder fields only keep the segmentation model small).
DEIT_SMALL = {
    "patch_size": 16, "hidden_size": 384, "num_hidden_layers": 2, "num_attention_heads": 6,
    "intermediate_size": 1536, "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 4, "decoder_intermediate_size": 64,
}  # fmt: skip


@pytest.fixture(scope="module")
def timm_deit():
    """A 2-layer deit_small_patch16_224 with random, non-default weights (LayerNorms and biases included)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=2).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def timm_pre_norm_tokens(model, pixel_values):
    """timm's token sequence after the last block, before the final LayerNorm."""
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixel_values))))
    for block in model.blocks:
        tokens = block(tokens)
    return tokens


def cam_config(**overrides):
    return WeakTrConfig(**{**DEIT_SMALL, "num_labels": 1, **overrides})


def test_encoder_matches_timm_pre_norm_blocks_with_one_class_token(timm_deit):
    model = WeakTrForCAM(cam_config()).eval()
    load_timm_backbone(model, timm_deit)
    pixel_values = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model.weaktr(pixel_values).last_hidden_state
        reference = timm_pre_norm_tokens(timm_deit, pixel_values)
    assert ours.shape == reference.shape == (2, 197, 384)
    assert (ours - reference).abs().max() < 1e-5


def test_segmentation_encoder_matches_timm_forward_features(timm_deit):
    model = WeakTrForSemanticSegmentation(cam_config(num_labels=3)).eval()
    load_timm_backbone(model, timm_deit)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.weaktr(pixel_values).last_hidden_state
        reference = timm_deit.forward_features(pixel_values)  # includes the final LayerNorm
    assert (ours - reference).abs().max() < 1e-5


def test_report_lists_unused_classifier_and_final_norm_of_cam_model(timm_deit):
    model = WeakTrForCAM(cam_config(num_labels=3))
    report = load_timm_backbone(model, timm_deit)
    assert isinstance(report, BackboneLoadingReport)
    assert sorted(report.unused_keys) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert report.missing_keys == []
    encoder_keys = {key.removeprefix("weaktr.") for key in model.state_dict() if key.startswith("weaktr.")}
    assert set(report.loaded_keys) == encoder_keys


def test_report_of_segmentation_model_uses_final_norm(timm_deit):
    model = WeakTrForSemanticSegmentation(cam_config(num_labels=3))
    report = load_timm_backbone(model, timm_deit)
    assert sorted(report.unused_keys) == ["head.bias", "head.weight"]
    assert report.missing_keys == []
    torch.testing.assert_close(model.weaktr.norm.weight, timm_deit.norm.weight)


def test_class_token_and_its_position_row_are_repeated_for_each_class(timm_deit):
    model = WeakTrForCAM(cam_config(num_labels=4))
    load_timm_backbone(model, timm_deit)
    encoder = model.weaktr
    assert encoder.cls_token.shape == (1, 4, 384)
    for index in range(4):
        torch.testing.assert_close(encoder.cls_token[0, index], timm_deit.cls_token[0, 0])
        torch.testing.assert_close(encoder.pos_embed[0, index], timm_deit.pos_embed[0, 0])
    torch.testing.assert_close(encoder.pos_embed[:, 4:], timm_deit.pos_embed[:, 1:])  # same 14 x 14 grid: as is


def timm_patch_table(model, grid, mode):
    """timm's 14 x 14 patch position rows resized to `grid` at the target size."""
    table = model.pos_embed[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=grid, mode=mode, align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], 384)


def test_cam_model_position_rows_are_resized_bicubically_to_its_grid(timm_deit):
    model = WeakTrForCAM(cam_config(num_labels=2, image_size=(160, 192)))
    load_timm_backbone(model, timm_deit)
    assert model.weaktr.pos_embed.shape == (1, 2 + 10 * 12, 384)
    torch.testing.assert_close(model.weaktr.pos_embed[:, 2:], timm_patch_table(timm_deit, (10, 12), "bicubic"))


def test_segmentation_model_position_rows_are_resized_bilinearly_to_its_grid(timm_deit):
    # The authors' step-2 encoder resizes the ImageNet table to the training crop's grid bilinearly
    # (OnlineRetraining/segm/model/utils.py:37).
    model = WeakTrForSemanticSegmentation(cam_config(num_labels=2, image_size=(160, 192)))
    load_timm_backbone(model, timm_deit)
    assert model.weaktr.pos_embed.shape == (1, 1 + 10 * 12, 384)
    torch.testing.assert_close(model.weaktr.pos_embed[:, :1], timm_deit.pos_embed[:, :1])
    torch.testing.assert_close(model.weaktr.pos_embed[:, 1:], timm_patch_table(timm_deit, (10, 12), "bilinear"))


def test_state_dict_wrapped_in_model_key_loads_like_the_module(timm_deit, tmp_path):
    path = tmp_path / "deit.pth"
    torch.save({"model": timm_deit.state_dict()}, path)
    from_file, from_module = WeakTrForCAM(cam_config()), WeakTrForCAM(cam_config())
    load_timm_backbone(from_file, str(path))
    load_timm_backbone(from_module, timm_deit)
    for (name, left), right in zip(from_file.weaktr.state_dict().items(), from_module.weaktr.state_dict().values()):
        torch.testing.assert_close(left, right, msg=name)


def test_unexpected_key_is_named_in_strict_error(timm_deit):
    state_dict = dict(timm_deit.state_dict())
    state_dict["blocks.0.attn.extra_scale"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.0\.attn\.extra_scale'\]"):
        load_timm_backbone(WeakTrForCAM(cam_config()), state_dict)


def test_missing_key_is_named_in_strict_error_and_reported_otherwise(timm_deit):
    state_dict = dict(timm_deit.state_dict())
    del state_dict["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\.mlp\.fc2\.weight'\]"):
        load_timm_backbone(WeakTrForCAM(cam_config()), state_dict)
    report = load_timm_backbone(WeakTrForCAM(cam_config()), state_dict, strict=False)
    assert report.missing_keys == ["blocks.1.mlp.fc2.weight"]


def test_checkpoint_of_another_width_names_the_mismatched_key():
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)  # width 192
    with pytest.raises(ValueError, match=r"'cls_token' has shape \(1, 1, 192\).*\(1, 1, 384\)"):
        load_timm_backbone(WeakTrForCAM(cam_config()), tiny)


def test_non_weaktr_model_is_rejected():
    with pytest.raises(TypeError, match="WeakTr model"):
        load_timm_backbone(torch.nn.Linear(2, 2), {})


# ---------------------------------------------------------------------------------------------------------------------
# The authors' step-2 backbones: DINOv2-S and EVA-02-S pretrained on 14-px patches
# ---------------------------------------------------------------------------------------------------------------------

VARIANT_FIELDS = {
    "dinov2": {"layerscale_value": 1.0},
    "eva02": {"use_gated_mlp": True, "intermediate_size": 1024, "hidden_act": "silu", "key_bias": False,
              "use_rope": True},
}  # fmt: skip
TIMM_NAMES = {"dinov2": "vit_small_patch14_dinov2", "eva02": "eva02_small_patch14_224"}


def timm_pretrained_like(variant):
    """The pretrained model as timm builds it (14-px patches, its own grid and eps; EVA's pooled-feature `fc_norm`),
    2 layers deep, with random non-default weights."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False, depth=2, img_size=224).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def authors_initialised_timm(variant, source):
    """timm configured like the authors' step-2 encoder (patch 16, 224 crop, eps 1e-5, final norm on all tokens),
    given `source`'s weights with the authors' loading steps done here by hand: kernel 14 -> 16 bicubic, table
    16 x 16 -> 14 x 14 bilinear, EVA's `fc_norm` as `norm`."""
    extra = {"global_pool": "token", "use_fc_norm": False} if variant == "eva02" else {}
    reference = timm.create_model(
        TIMM_NAMES[variant], pretrained=False, depth=2, img_size=224, patch_size=16,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), **extra,
    ).eval()  # fmt: skip
    state = {key.replace("fc_norm.", "norm."): value for key, value in source.state_dict().items()}
    state["patch_embed.proj.weight"] = F.interpolate(state["patch_embed.proj.weight"], size=(16, 16), mode="bicubic",
                                                     align_corners=False)  # fmt: skip
    table = state["pos_embed"][:, 1:].reshape(1, 16, 16, 384).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(14, 14), mode="bilinear", align_corners=False)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], table.permute(0, 2, 3, 1).reshape(1, 196, 384)], 1)
    state = {key: value for key, value in state.items() if key in reference.state_dict()}
    reference.load_state_dict(state, strict=True)
    return reference


def variant_segmenter(variant):
    config = cam_config(num_labels=3, layer_norm_eps=1e-5, **VARIANT_FIELDS[variant])
    return WeakTrForSemanticSegmentation(config).eval()


@pytest.mark.parametrize("variant", ["dinov2", "eva02"])
def test_14px_backbone_loads_with_the_authors_kernel_resize(variant):
    source = timm_pretrained_like(variant)
    assert source.patch_embed.proj.weight.shape[-1] == 14
    model = variant_segmenter(variant)
    report = load_timm_backbone(model, source)
    assert report.missing_keys == []
    reference = authors_initialised_timm(variant, source)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.weaktr(pixel_values).last_hidden_state
        expected = reference.forward_features(pixel_values)
    assert (tokens - expected).abs().max() < 1e-5


def test_official_eva02_file_layout_loads_like_the_timm_model(tmp_path):
    """The official EVA-02 MIM file: packed `mlp.w12` / `mlp.w3`, `norm`, rotary buffers, mask token and MIM head,
    under a `module` key."""
    source = timm_pretrained_like("eva02")
    renames = (("mlp.fc1.", "mlp.w12."), ("mlp.fc2.", "mlp.w3."), ("fc_norm.", "norm."))
    official = {}
    for key, value in source.state_dict().items():
        for timm_name, official_name in renames:
            key = key.replace(timm_name, official_name)
        official[key] = value
    official.update(mask_token=torch.zeros(1, 1, 384), **{"lm_head.weight": torch.zeros(512, 384)})
    official["rope.freqs_cos"] = official["blocks.0.attn.rope.freqs_cos"] = torch.zeros(256, 64)
    path = tmp_path / "eva02_S_pt_in21k_p14.pt"
    torch.save({"module": official}, path)
    from_file, from_module = variant_segmenter("eva02"), variant_segmenter("eva02")
    report = load_timm_backbone(from_file, str(path))
    load_timm_backbone(from_module, source)
    assert sorted(report.unused_keys) == ["lm_head.weight", "mask_token"]
    for (name, left), right in zip(from_file.state_dict().items(), from_module.state_dict().values()):
        if name.startswith("weaktr."):
            torch.testing.assert_close(left, right, rtol=0, atol=0, msg=name)


def test_backbone_of_another_variant_is_refused_with_the_fields_to_set():
    source = timm_pretrained_like("dinov2")
    with pytest.raises(ValueError, match=r"has dinov2 blocks but the model's encoder is configured as vit"):
        load_timm_backbone(WeakTrForSemanticSegmentation(cam_config(num_labels=3)), source)


def test_named_vit_s_weights_resize_the_position_table_bicubically(monkeypatch, timm_deit):
    """The authors' ViT-S came through timm 0.5.4's npz loader, whose table resize is bicubic."""
    name = "vit_small_patch16_384.augreg_in21k_ft_in1k"
    monkeypatch.setattr(timm, "create_model", lambda model_name, pretrained: timm_deit)
    model = WeakTrForSemanticSegmentation(cam_config(num_labels=2, image_size=(160, 192)))
    load_timm_backbone(model, name)
    torch.testing.assert_close(model.weaktr.pos_embed[:, 1:], timm_patch_table(timm_deit, (10, 12), "bicubic"))


def test_named_weights_set_the_table_resize_of_step_2_only(monkeypatch, timm_deit):
    """A name's resize mode describes the authors' step-2 loading; step 1 keeps its bicubic resize."""
    monkeypatch.setattr(timm, "create_model", lambda model_name, pretrained: timm_deit)
    model = WeakTrForCAM(cam_config(num_labels=2, image_size=(160, 192)))
    load_timm_backbone(model, "vit_small_patch14_dinov2.lvd142m")  # bilinear for step 2
    torch.testing.assert_close(model.weaktr.pos_embed[:, 2:], timm_patch_table(timm_deit, (10, 12), "bicubic"))
