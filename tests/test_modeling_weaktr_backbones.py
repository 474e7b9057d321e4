"""Encoder variants of the authors' step-2 backbones (DINOv2-S: LayerScale; EVA-02-S: gated MLP, q/v biases, 2-D
RoPE) against timm configured like the authors (OnlineRetraining/segm/model/): patch 16, LayerNorm eps 1e-5,
EVA's final norm on all tokens. timm models are built with `pretrained=False` and their weights perturbed, so every
tensor matters; the keys are timm's, so the weights are copied one to one.
"""

from functools import partial

import pytest
import timm
import torch
from conftest import authors_rope_table
from torch import nn

from weaktr_hf import WeakTrConfig, WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrModel
from weaktr_hf.modeling_weaktr import build_2d_rope, rotate_interleaved

pytestmark = pytest.mark.usefixtures("single_thread")

TIMM_NAMES = {"dinov2": "vit_small_patch14_dinov2", "eva02": "eva02_small_patch14_224"}
# The WeakTrConfig fields of each variant; everything else is the DeiT-S default.
VARIANT_FIELDS = {
    "dinov2": {"layerscale_value": 1.0},
    "eva02": {"use_gated_mlp": True, "intermediate_size": 1024, "hidden_act": "silu", "key_bias": False,
              "use_rope": True},
}  # fmt: skip


def timm_encoder(variant, image_size, depth=12, seed=0):
    """timm's encoder configured like the authors' step-2 encoder, with random non-default weights."""
    extra = {"global_pool": "token", "use_fc_norm": False} if variant == "eva02" else {}
    torch.manual_seed(seed)
    model = timm.create_model(
        TIMM_NAMES[variant], pretrained=False, img_size=image_size, patch_size=16, num_classes=0, depth=depth,
        norm_layer=partial(nn.LayerNorm, eps=1e-5), **extra,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def segmenter_like(variant, reference, depth=12):
    """A 480-crop WeakTr segmenter of `variant` carrying `reference`'s encoder weights."""
    config = WeakTrConfig(image_size=480, num_hidden_layers=depth, layer_norm_eps=1e-5, num_labels=21,
                          **VARIANT_FIELDS[variant])  # fmt: skip
    torch.manual_seed(1)
    model = WeakTrForSemanticSegmentation(config).eval()
    model.weaktr.load_state_dict(reference.state_dict(), strict=True)
    return model


def max_diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", ["dinov2", "eva02"])
def test_encoder_and_logits_match_timm_at_the_training_crop(variant):
    reference = timm_encoder(variant, 480)
    model = segmenter_like(variant, reference)
    pixel_values = torch.randn(1, 3, 480, 480)
    with torch.no_grad():
        expected_tokens = reference.forward_features(pixel_values)
        expected_logits = model.decoder(expected_tokens[:, 1:], (30, 30))[0]
        tokens = model.weaktr(pixel_values).last_hidden_state
        eager = model.weaktr(pixel_values, output_attentions=True).last_hidden_state  # eager attention path
        logits = model(pixel_values).logits
    assert tokens.shape == (1, 901, 384)
    assert max_diff(tokens, expected_tokens) < 1e-4
    assert max_diff(eager, expected_tokens) < 1e-4
    assert max_diff(logits, expected_logits) < 1e-4


@pytest.mark.parametrize("variant", ["dinov2", "eva02"])
def test_other_grids_match_timm_built_for_that_grid(variant):
    """At 512x512 and a non-square 384x512 input, timm is built for that grid and given our resized position table,
    so the comparison checks the rest: for EVA-02 the RoPE rescaled per axis (timm's rule for any grid)."""
    reference = timm_encoder(variant, 480, depth=2)
    model = segmenter_like(variant, reference, depth=2)
    for height, width in ((512, 512), (384, 512)):
        grid = (height // 16, width // 16)
        at_size = timm_encoder(variant, (height, width), depth=2)
        state = dict(reference.state_dict(), pos_embed=model.weaktr.interpolate_pos_encoding(grid).detach())
        at_size.load_state_dict(state, strict=True)
        pixel_values = torch.randn(1, 3, height, width)
        with torch.no_grad():
            expected_tokens = at_size.forward_features(pixel_values)
            expected_logits = model.decoder(expected_tokens[:, 1:], grid)[0]
            outputs = model(pixel_values, output_hidden_states=True)
            tokens = model.weaktr(pixel_values).last_hidden_state
        assert max_diff(tokens, expected_tokens) < 1e-4, (height, width)
        assert max_diff(outputs.logits, expected_logits) < 1e-4, (height, width)


def test_rope_table_equals_the_authors_at_their_grid_and_timm_at_any_grid():
    cos, sin = build_2d_rope((30, 30), 64, 10000.0, 16)
    authors_cos, authors_sin = authors_rope_table(30)
    assert torch.equal(cos, authors_cos) and torch.equal(sin, authors_sin)
    from timm.layers import RotaryEmbeddingCat

    for grid in ((30, 30), (24, 32), (5, 3)):
        timm_rope = RotaryEmbeddingCat(64, in_pixels=False, feat_shape=list(grid), ref_feat_shape=(16, 16))
        timm_sin, timm_cos = timm_rope.get_embed().tensor_split(2, -1)
        cos, sin = build_2d_rope(grid, 64, 10000.0, 16)
        torch.testing.assert_close(cos, timm_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, timm_sin, rtol=0, atol=1e-6)


def test_rotation_pairs_are_interleaved():
    assert rotate_interleaved(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-2.0, 1.0, -4.0, 3.0]


# ---------------------------------------------------------------------------------------------------------------------
# Variants in the package's own models (tiny configs)
# ---------------------------------------------------------------------------------------------------------------------

TINY_VARIANTS = {
    "dinov2": {"layerscale_value": 0.5},
    "eva02": {"use_gated_mlp": True, "hidden_act": "silu", "key_bias": False, "use_rope": True},
}


def test_plain_config_keeps_the_plain_vit_keys(tester):
    keys = set(WeakTrModel(tester.get_config()).state_dict())
    assert not any(".ls1." in key or ".ls2." in key or "q_bias" in key or "v_bias" in key for key in keys)
    assert "blocks.0.attn.qkv.bias" in keys and "blocks.0.mlp.fc1.weight" in keys


def test_variant_parameters_and_their_initial_values(tester):
    dino = WeakTrModel(tester.get_config(**TINY_VARIANTS["dinov2"]))
    assert torch.equal(dino.blocks[1].ls2.gamma, torch.full((32,), 0.5))
    eva = WeakTrModel(tester.get_config(**TINY_VARIANTS["eva02"], intermediate_size=48))
    attention = eva.blocks[0].attn
    assert attention.qkv.bias is None and torch.equal(attention.q_bias, torch.zeros(32))
    assert eva.blocks[0].mlp.fc1.weight.shape == (96, 32) and eva.blocks[0].mlp.fc2.weight.shape == (32, 48)


def heads(states):
    """(1, 5, 32) -> (1, 4 heads, 5, 8)."""
    return states.view(1, 5, 4, 8).transpose(1, 2)


def test_key_bias_stays_zero_while_query_and_value_biases_act(tester):
    model = WeakTrModel(tester.get_config(**TINY_VARIANTS["eva02"])).eval()
    attention = model.blocks[0].attn
    hidden_states = torch.randn(1, 5, 32)
    with torch.no_grad():
        attention.q_bias.normal_()
        attention.v_bias.normal_()
        projected = torch.nn.functional.linear(hidden_states, attention.qkv.weight)
        query, key, value = projected.chunk(3, dim=-1)
        probs = torch.softmax(heads(query + attention.q_bias) @ heads(key).transpose(-1, -2) * 8**-0.5, dim=-1)
        expected = attention.proj((probs @ heads(value + attention.v_bias)).transpose(1, 2).reshape(1, 5, 32))
        output, _ = attention(hidden_states)
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("variant", ["vit", "eva02"])
def test_qkv_projection_is_called_as_a_module(tester, variant):
    """Adapters (LoRA), quantised linears and hooks replace or wrap `attn.qkv`: the forward must call it."""
    model = WeakTrModel(tester.get_config(**TINY_VARIANTS.get(variant, {}))).eval()
    calls = []
    model.blocks[1].attn.qkv.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    with torch.no_grad():
        model(tester.prepare_pixel_values(1))
    assert calls == [(1, 17, 96)]


def test_rope_leaves_prefix_tokens_unrotated_and_moves_patches(tester):
    """Step 1 has C class tokens before the patches: only the patches are rotated."""
    model = WeakTrForCAM(tester.get_config(**TINY_VARIANTS["eva02"])).eval()
    pixel_values = tester.prepare_pixel_values(1)
    with torch.no_grad():
        with_rope = model.weaktr(pixel_values, output_attentions=True).attentions[0]
        model.config.use_rope = False
        without = model.weaktr(pixel_values, output_attentions=True).attentions[0]
    num_classes = model.config.num_labels
    # Class-token queries against class-token keys are not rotated; patch pairs are.
    torch.testing.assert_close(with_rope[..., :num_classes, :num_classes] / with_rope[..., :num_classes, :1],
                               without[..., :num_classes, :num_classes] / without[..., :num_classes, :1])
    assert (with_rope[..., num_classes:, num_classes:] - without[..., num_classes:, num_classes:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["dinov2", "eva02"])
def test_sdpa_equals_eager_attention(tester, variant):
    config = tester.get_segmentation_config(**TINY_VARIANTS[variant])
    model = WeakTrForSemanticSegmentation(config).eval()
    pixel_values = tester.prepare_pixel_values(2, 24, 40)
    with torch.no_grad():
        sdpa = model.weaktr(pixel_values).last_hidden_state
        eager = model.weaktr(pixel_values, output_attentions=True).last_hidden_state
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_attention_outputs_include_layerscale(tester):
    """AAF's per-layer attention output is the branch the residual adds: after LayerScale."""
    model = WeakTrForCAM(tester.get_config(**TINY_VARIANTS["dinov2"])).eval()
    pixel_values = tester.prepare_pixel_values(1)
    with torch.no_grad():
        before = model.weaktr(pixel_values, output_attention_outputs=True).attention_outputs[0]
        model.weaktr.blocks[0].ls1.gamma.mul_(3.0)
        after = model.weaktr(pixel_values, output_attention_outputs=True).attention_outputs[0]
    torch.testing.assert_close(after, 3.0 * before)


@pytest.mark.parametrize("variant", ["dinov2", "eva02"])
@pytest.mark.parametrize("model_class", [WeakTrForCAM, WeakTrForSemanticSegmentation])
def test_variants_train_save_and_load(tester, tmp_path, variant, model_class):
    """Every parameter gets a finite gradient, and a save/load round trip reproduces the outputs exactly."""
    if model_class is WeakTrForCAM:
        config, labels = tester.get_config(**TINY_VARIANTS[variant]), tester.prepare_cam_labels(2)
    else:
        config = tester.get_segmentation_config(**TINY_VARIANTS[variant])
        labels = torch.randint(0, config.num_labels, (2, 32, 32))
    model = model_class(config).train()
    pixel_values = tester.prepare_pixel_values(2)
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.weaktr.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path)
    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert all(getattr(loaded.config, name) == value for name, value in TINY_VARIANTS[variant].items())
    pixel_values = tester.prepare_pixel_values(1, 24, 40)
    with torch.no_grad():
        before, after = model(pixel_values), loaded(pixel_values)
    for name, value in before.items():
        if value is not None and name != "loss":
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"key_bias": False, "qkv_bias": False}, "needs qkv_bias=True"),
        ({"use_rope": True, "hidden_size": 24, "num_attention_heads": 4}, "divisible by 4"),
        ({"layerscale_value": True}, "layerscale_value must be a number"),
        ({"rope_theta": 0.0}, "rope_theta must be positive"),
    ],
)
def test_config_rejects_inconsistent_variants(tester, overrides, message):
    with pytest.raises(ValueError, match=message):
        tester.get_config(**overrides)


def test_all_variants_compile_in_one_graph_and_match_eager(tester):
    """LayerScale, the gated MLP, q/v biases and RoPE together: one Dynamo graph (`fullgraph=True`, `aot_eager` as in
    tests/test_fast_paths.py) at the training grid and at another one, equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    config = tester.get_segmentation_config(**TINY_VARIANTS["dinov2"], **TINY_VARIANTS["eva02"])
    model = WeakTrForSemanticSegmentation(config).eval()
    torch._dynamo.reset()
    try:
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for height, width in [(32, 32), (40, 24)]:
            pixel_values = tester.prepare_pixel_values(2, height, width)
            with torch.no_grad():
                torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits,
                                           rtol=1e-5, atol=1e-5)  # fmt: skip
        assert counter.frame_count >= 1
    finally:
        torch._dynamo.reset()
