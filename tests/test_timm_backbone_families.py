"""Backbones past the paper's: WeakTr models built from timm DINOv3, DINOv2 (with registers), EVA-02 and DeiT-III
models (`from_timm_backbone`), their parity with timm, the config read from the model, and the ways to give one.

timm models are built with `pretrained=False` at depth 2 (the full-depth base-size check per family is in
benchmarks/bench_models.py) and their weights perturbed, so every tensor matters.
"""

import pytest
import timm
import torch

from weaktr_hf import WeakTrConfig, WeakTrForCAM, WeakTrForSemanticSegmentation, load_timm_backbone
from weaktr_hf.modeling_weaktr import build_2d_rope, rotate_half
from weaktr_hf.timm_backbone import prepare_timm_backbone, timm_backbone_config

pytestmark = pytest.mark.usefixtures("single_thread")

# The five timm names; (224, 224) and a non-square (320, 480) input, batch 2.
FAMILIES = [
    "vit_small_patch16_dinov3",
    "vit_base_patch16_dinov3_qkvb",
    "vit_base_patch14_reg4_dinov2",
    "eva02_base_patch14_224",
    "deit3_small_patch16_224",
]
SIZES = [(224, 224), (320, 480)]
SEG_LABELS = {0: "background", 1: "cat", 2: "dog"}
CAM_LABELS = {0: "cat"}


def timm_model(name, size, depth=2, seed=0):
    """`name` at `depth` with random non-default weights. DINOv3 takes any size (rotary positions only); the others
    are built for `size`, and the 14-px families with 16-px patches at 320x480 (as the authors' step 2), since 14
    does not divide it."""
    kwargs = {} if "dinov3" in name else {"img_size": size}
    if "patch14" in name and size != (224, 224):
        kwargs["patch_size"] = 16
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, depth=depth, **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def timm_tokens(model, pixel_values):
    """timm's tokens after the last block (`pre_norm`) and after the final norm: `forward_features`, with timm EVA's
    pooled-feature `fc_norm` applied to every token (the final norm WeakTr's encoder takes from it)."""
    captured = {}
    hook = model.blocks[-1].register_forward_hook(lambda module, args, output: captured.update(tokens=output))
    features = model.forward_features(pixel_values)
    hook.remove()
    if not isinstance(model.fc_norm, torch.nn.Identity):
        features = model.fc_norm(features)
    return captured["tokens"], features


def max_diff(ours, reference):
    assert ours.shape == reference.shape
    return (ours - reference).abs().max().item()


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
@pytest.mark.parametrize("name", FAMILIES)
def test_segmenter_and_cam_model_match_timm_patch_tokens(name, size):
    reference = timm_model(name, size)
    segmenter = WeakTrForSemanticSegmentation.from_timm_backbone(reference, id2label=SEG_LABELS).eval()
    cam_model = WeakTrForCAM.from_timm_backbone(reference, id2label=CAM_LABELS).eval()
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    prefix = reference.num_prefix_tokens  # [CLS] + registers, as one class token + registers in WeakTr
    with torch.no_grad():
        pre_norm, features = timm_tokens(reference, pixel_values)
        seg_tokens = segmenter.weaktr(pixel_values).last_hidden_state
        cam_tokens = cam_model.weaktr(pixel_values).last_hidden_state  # step 1 has no final norm
        logits = segmenter(pixel_values).logits
    grid = (size[0] // segmenter.config.patch_size, size[1] // segmenter.config.patch_size)
    assert seg_tokens.shape == features.shape == (2, prefix + grid[0] * grid[1], reference.embed_dim)
    assert max_diff(seg_tokens[:, prefix:], features[:, prefix:]) <= 1e-4
    assert max_diff(cam_tokens[:, prefix:], pre_norm[:, prefix:]) <= 1e-4
    assert max_diff(seg_tokens, features) <= 1e-4  # class token and registers too
    with torch.no_grad():
        expected_logits = segmenter.decoder(features[:, prefix:], grid)[0]
    assert max_diff(logits, expected_logits) <= 1e-4


# The other sizes of each family (and DINOv3-S+ with its gated MLP), segmenter only, at 224x224.
OTHER_SIZES = [
    "vit_small_plus_patch16_dinov3",
    "vit_base_patch16_dinov3",
    "vit_large_patch16_dinov3",
    "vit_large_patch16_dinov3_qkvb",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "eva02_small_patch14_224",
    "eva02_large_patch14_224",
    "deit3_large_patch16_224",
    "deit_small_patch16_224",
]


@pytest.mark.parametrize("name", OTHER_SIZES)
def test_other_sizes_match_timm_patch_tokens(name):
    reference = timm_model(name, (224, 224))
    segmenter = WeakTrForSemanticSegmentation.from_timm_backbone(reference, id2label=SEG_LABELS).eval()
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, features = timm_tokens(reference, pixel_values)
        tokens = segmenter.weaktr(pixel_values).last_hidden_state
    prefix = reference.num_prefix_tokens
    assert max_diff(tokens[:, prefix:], features[:, prefix:]) <= 1e-4


def test_dinov3_config_is_read_from_the_model():
    fields = timm_backbone_config(timm_model("vit_base_patch16_dinov3_qkvb", (224, 224)))
    expected = {
        "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 2, "intermediate_size": 3072,
        "patch_size": 16, "num_register_tokens": 4, "use_absolute_position_embeddings": False, "use_rope": True,
        "rope_type": "dinov3", "rope_theta": 100.0, "layerscale_value": 1e-5, "qkv_bias": True, "key_bias": False,
        "use_gated_mlp": False, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    }  # fmt: skip
    assert {key: fields[key] for key in expected} == expected
    assert timm_backbone_config(timm_model("vit_small_patch16_dinov3", (224, 224)))["qkv_bias"] is False


def test_eva02_base_config_has_the_mlp_norm_and_reference_grid():
    fields = timm_backbone_config(timm_model("eva02_base_patch14_224", (224, 224)))
    assert fields["use_gated_mlp"] and fields["use_mlp_norm"] and fields["intermediate_size"] == 2048
    assert (fields["rope_type"], fields["rope_reference_grid"], fields["key_bias"]) == ("eva02", 16, False)
    assert fields["patch_size"] == 14 and fields["image_size"] == 224


@pytest.mark.parametrize(("name", "width", "heads"), [("deit3_small_patch16_224", 384, 6),
                                                      ("vit_base_patch16_dinov3_qkvb", 768, 12)])  # fmt: skip
def test_segmenter_decoder_follows_the_encoder_width(name, width, heads):
    """The authors' Segmenter decoder: width of the encoder, width / 64 heads, MLP 4 x width (factory.py:119-125)."""
    config = prepare_timm_backbone(timm_model(name, (224, 224)), "segmentation").config_fields
    assert (config["decoder_hidden_size"], config["decoder_num_attention_heads"]) == (width, heads)
    assert config["decoder_intermediate_size"] == 4 * width


def test_cam_fusion_covers_every_head_of_every_layer_and_leaves_registers_out():
    reference = timm_model("vit_base_patch16_dinov3_qkvb", (224, 224))
    model = WeakTrForCAM.from_timm_backbone(reference, id2label={0: "cat", 1: "dog", 2: "bird"}).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    assert outputs.head_weights.shape == (1, 2 * 12)  # layers x heads (144 at full depth)
    assert outputs.fine_cam.shape == outputs.cross_attention.shape == (1, 3, 4, 6)
    # The CAM head sees the patch tokens only: after the 3 class tokens and the 4 registers.
    tokens = outputs.hidden_states[-1]
    assert tokens.shape[1] == 3 + 4 + 24
    patch_map = tokens[:, 7:].transpose(1, 2).reshape(1, 768, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(outputs.coarse_cam, model.head(patch_map))


def test_class_tokens_and_registers_carry_no_rotary_position():
    """With DINOv3's rotary embedding, the class tokens and registers are not rotated: their attention to each
    other does not change when the patches' rotary table does."""
    reference = timm_model("vit_small_patch16_dinov3", (224, 224))
    model = WeakTrForCAM.from_timm_backbone(reference, id2label={0: "cat", 1: "dog"}).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with_rope = model.weaktr(pixel_values, output_attentions=True).attentions[0]
        model.config.rope_theta = 7.0  # another table for the patches
        changed = model.weaktr(pixel_values, output_attentions=True).attentions[0]
    prefix = 2 + 4
    scores, other = with_rope[..., :prefix, :prefix], changed[..., :prefix, :prefix]
    torch.testing.assert_close(scores / scores[..., :1], other / other[..., :1])
    assert (with_rope[..., prefix:, prefix:] - changed[..., prefix:, prefix:]).abs().max() > 1e-3


def test_dinov3_rotary_table_and_rotation_equal_timm():
    from timm.layers import RotaryEmbeddingDinoV3
    from timm.layers.pos_embed_sincos import rope_rotate_half

    rope = RotaryEmbeddingDinoV3(64, temperature=100.0)
    for grid in ((14, 14), (20, 30), (3, 5)):
        timm_sin, timm_cos = rope.get_embed(shape=list(grid)).tensor_split(2, -1)
        cos, sin = build_2d_rope(grid, 64, 100.0, 16, rope_type="dinov3")
        torch.testing.assert_close(cos, timm_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, timm_sin, rtol=0, atol=1e-6)
    states = torch.randn(2, 3, 8)
    assert torch.equal(rotate_half(states), rope_rotate_half(states))


def test_unknown_family_is_refused_with_the_supported_list():
    with pytest.raises(ValueError, match=r"ConvNeXt is not a supported timm backbone\. Supported: .*DINOv3"):
        WeakTrForSemanticSegmentation.from_timm_backbone(timm.create_model("convnext_atto", pretrained=False))


def test_unsupported_feature_of_a_supported_family_is_named():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, qk_norm=True)
    with pytest.raises(ValueError, match=r"has q/k normalisation, which WeakTr's encoder does not implement"):
        WeakTrForCAM.from_timm_backbone(model)


def test_local_timm_folder_builds_the_same_model_offline(tmp_path):
    """A folder in timm's save format (config.json with the architecture and its arguments + model.safetensors)."""
    reference = timm_model("vit_small_patch16_dinov3", (224, 224))
    timm.models.save_for_hf(reference, tmp_path / "dinov3")
    from_folder = WeakTrForSemanticSegmentation.from_timm_backbone(str(tmp_path / "dinov3"), id2label=SEG_LABELS)
    from_module = WeakTrForSemanticSegmentation.from_timm_backbone(reference, id2label=SEG_LABELS)
    assert from_folder.config.num_hidden_layers == 2 and from_folder.config.num_register_tokens == 4
    for (name, left), right in zip(from_folder.weaktr.state_dict().items(), from_module.weaktr.state_dict().values()):
        torch.testing.assert_close(left, right, rtol=0, atol=0, msg=name)


def test_checkpoint_file_needs_its_architecture(tmp_path):
    from safetensors.torch import save_file

    reference = timm_model("deit3_small_patch16_224", (224, 224), depth=12)
    path = tmp_path / "deit3.safetensors"
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"holds weights only: also give the timm architecture"):
        WeakTrForCAM.from_timm_backbone(str(path))
    model = WeakTrForCAM.from_timm_backbone(str(path), arch="deit3_small_patch16_224", id2label=CAM_LABELS)
    torch.testing.assert_close(model.weaktr.blocks[11].ls2.gamma, reference.blocks[11].ls2.gamma, rtol=0, atol=0)


def test_state_dict_without_class_position_row_loads_its_patch_rows(tmp_path):
    """DeiT-III files have a position table of patches only (no row for [CLS]): the rows are taken as patches."""
    reference = timm_model("deit3_small_patch16_224", (224, 224))
    config = WeakTrConfig(**dict(timm_backbone_config(reference), id2label=SEG_LABELS))
    model = WeakTrForSemanticSegmentation(config)
    load_timm_backbone(model, dict(reference.state_dict()))
    torch.testing.assert_close(model.weaktr.pos_embed[:, 1:], reference.pos_embed)
    assert torch.equal(model.weaktr.pos_embed[:, :1], torch.zeros(1, 1, 384))


@pytest.mark.parametrize("name", ["eva02_base_patch14_224", "vit_base_patch16_dinov3_qkvb"])
def test_timm_state_dict_file_loads_like_the_model(name, tmp_path):
    """A plain timm state-dict file (Eva's `gamma_1`, split `q_proj` / `k_proj` / `v_proj` and `fc1_g` / `fc1_x`)
    loads into a model of the same config exactly as the timm model does."""
    reference = timm_model(name, (224, 224))
    torch.save(reference.state_dict(), tmp_path / "backbone.pth")
    config = WeakTrConfig(**dict(timm_backbone_config(reference), id2label=SEG_LABELS))
    from_file, from_module = WeakTrForSemanticSegmentation(config), WeakTrForSemanticSegmentation(config)
    load_timm_backbone(from_file, str(tmp_path / "backbone.pth"))
    load_timm_backbone(from_module, reference)
    for (key, left), right in zip(from_file.weaktr.state_dict().items(), from_module.weaktr.state_dict().values()):
        torch.testing.assert_close(left, right, rtol=0, atol=0, msg=key)


def test_registers_and_no_position_table_train_save_and_load(tester, tmp_path):
    """A tiny DINOv3-layout segmenter: every parameter gets a gradient, and a save / load round trip is exact."""
    config = tester.get_segmentation_config(
        num_register_tokens=2, use_absolute_position_embeddings=False, use_rope=True, rope_type="dinov3",
        rope_theta=100.0, layerscale_value=1e-5, key_bias=False,
    )  # fmt: skip
    model = WeakTrForSemanticSegmentation(config).train()
    assert model.weaktr.pos_embed is None and model.weaktr.reg_token.shape == (1, 2, 32)
    model(tester.prepare_pixel_values(2), labels=torch.randint(0, config.num_labels, (2, 32, 32))).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    model.eval().save_pretrained(tmp_path)
    loaded = WeakTrForSemanticSegmentation.from_pretrained(tmp_path).eval()
    pixel_values = tester.prepare_pixel_values(1, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
        sdpa = model.weaktr(pixel_values).last_hidden_state
        eager = model.weaktr(pixel_values, output_attentions=True).last_hidden_state
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_absolute_position_embeddings": False}, "without any position information"),
        ({"use_mlp_norm": True}, "set use_gated_mlp=True"),
        ({"rope_type": "cat"}, "rope_type must be one of"),
        ({"num_register_tokens": -1}, "num_register_tokens must be an integer >= 0"),
    ],
)
def test_config_rejects_inconsistent_new_fields(tester, overrides, message):
    with pytest.raises(ValueError, match=message):
        tester.get_config(**overrides)
