"""Every fast path equals the reference path it replaces, to 1e-5 on tiny random models (issue 7).

- SDPA attention (step 2 and the standalone encoder, when attention probabilities are not requested) vs eager
  softmax attention, forward and backward, and the dispatch itself;
- the step-1 Adaptive Attention Fusion, accumulated layer by layer, vs the stacked (B, heads * L, T, T) maps of the
  authors' layout, forward and the fusion weights' gradients;
- `torch.compile` vs eager for both models.

The compile tests use the `aot_eager` backend: it runs Dynamo's graph capture and AOTAutograd (so graph breaks and
tracing failures surface, with `fullgraph=True` for inference) but skips Inductor's C++ code generation, which takes
over a minute per tiny model on a 2-core CPU. Inductor's speed-up is measured by `benchmarks/bench_models.py
--compile`.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrModel

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# Attention probabilities and fused maps are ~1/T: compare them with a tighter absolute tolerance.
MAP_TOLERANCE = {"rtol": 1e-5, "atol": 1e-7}


def _pair(model_class, config, implementations=("eager", "sdpa")):
    """The same random weights under two attention implementations, in eval mode (each with its own config)."""
    first = model_class._from_config(copy.deepcopy(config), attn_implementation=implementations[0])
    second = model_class._from_config(copy.deepcopy(config), attn_implementation=implementations[1])
    second.load_state_dict(first.state_dict())
    assert first.config._attn_implementation == implementations[0]
    assert second.config._attn_implementation == implementations[1]
    return first.eval(), second.eval()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of F.scaled_dot_product_attention (transformers' SDPA path looks it up at call time)."""
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# SDPA vs eager attention
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(32, 32), (40, 56), (27, 45)])  # training grid, other grid, padded input
def test_segmentation_logits_and_hidden_states_match_between_sdpa_and_eager(tester, height, width):
    eager, sdpa = _pair(WeakTrForSemanticSegmentation, tester.get_segmentation_config())
    pixel_values = tester.prepare_pixel_values(2, height, width)
    with torch.no_grad():
        from_eager = eager(pixel_values, output_hidden_states=True)
        from_sdpa = sdpa(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(from_sdpa.logits, from_eager.logits, **TOLERANCE)
    for left, right in zip(from_sdpa.hidden_states, from_eager.hidden_states, strict=True):
        torch.testing.assert_close(left, right, **TOLERANCE)


def test_encoder_matches_between_sdpa_and_eager(tester):
    eager, sdpa = _pair(WeakTrModel, tester.get_segmentation_config())
    pixel_values = tester.prepare_pixel_values(2, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa(pixel_values).last_hidden_state, eager(pixel_values).last_hidden_state, **TOLERANCE
        )


def test_segmentation_gradients_match_between_sdpa_and_eager(tester):
    config = tester.get_segmentation_config(decoder_hidden_dropout_prob=0.0, clip_start_value=10.0)
    eager, sdpa = _pair(WeakTrForSemanticSegmentation, config)
    pixel_values = tester.prepare_pixel_values(2)
    labels = tester.prepare_segmentation_labels(2)
    losses = []
    for model in (eager, sdpa):
        model.train()
        loss = model(pixel_values, labels=labels).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], **TOLERANCE)
    eager_parameters = dict(eager.named_parameters())
    for name, parameter in sdpa.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, eager_parameters[name].grad, **TOLERANCE, msg=name)


def test_segmentation_uses_sdpa_unless_attentions_are_requested(tester, sdpa_calls):
    eager, sdpa = _pair(WeakTrForSemanticSegmentation, tester.get_segmentation_config())
    num_layers = eager.config.num_hidden_layers + eager.config.decoder_num_hidden_layers
    pixel_values = tester.prepare_pixel_values(2)
    with torch.no_grad():
        fast = sdpa(pixel_values)
        assert len(sdpa_calls) == num_layers and fast.attentions is None

        sdpa_calls.clear()
        with_attentions = sdpa(pixel_values, output_attentions=True)
        assert not sdpa_calls  # probabilities are needed, so every layer runs eagerly
        maps = with_attentions.attentions + with_attentions.decoder_attentions
        assert len(maps) == num_layers
        assert all(probs.shape[:2] == (2, eager.config.num_attention_heads) for probs in maps)
        torch.testing.assert_close(with_attentions.logits, fast.logits, **TOLERANCE)

        eager(pixel_values)
        assert not sdpa_calls


def test_cam_model_never_dispatches_to_sdpa(tester, sdpa_calls):
    """The fusion needs every layer's probabilities, so step 1 is eager even when SDPA is configured."""
    model = WeakTrForCAM._from_config(tester.get_config(), attn_implementation="sdpa").eval()
    with torch.no_grad():
        model(tester.prepare_pixel_values(2))
    assert not sdpa_calls


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_chosen_at_load_time_is_used(tester, tmp_path, sdpa_calls, implementation):
    saved = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    saved.save_pretrained(tmp_path)
    loaded = WeakTrForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert loaded.config._attn_implementation == implementation
    pixel_values = tester.prepare_pixel_values(2)
    with torch.no_grad():
        expected = saved(pixel_values).logits
        sdpa_calls.clear()
        logits = loaded(pixel_values).logits
    assert bool(sdpa_calls) == (implementation == "sdpa")
    torch.testing.assert_close(logits, expected, **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# Adaptive Attention Fusion: layer-by-layer accumulation vs the stacked maps
# ---------------------------------------------------------------------------------------------------------------------


def _stacked_fine_cam(attentions, head_weights, coarse_cam, num_classes):
    """Reference fine CAM from all K maps stacked head-major (channel head * L + layer), weighted, averaged."""
    batch_size, _, height, width = coarse_cam.shape
    stacked = torch.stack([attention.detach() for attention in attentions], dim=2)  # (B, heads, L, T, T)
    stacked = stacked.flatten(1, 2)  # (B, heads * L, T, T)
    fused = (head_weights[:, :, None, None] * stacked).mean(dim=1)
    cross = fused[:, :num_classes, num_classes:].reshape(batch_size, num_classes, height, width)
    patch = fused[:, num_classes:, num_classes:]
    cams = (cross * coarse_cam.detach().relu()).flatten(2)
    return cross, (patch @ cams.transpose(1, 2)).transpose(1, 2).reshape_as(coarse_cam)


@pytest.mark.parametrize("height, width", [(32, 32), (40, 56)])
def test_fused_fine_cam_and_fusion_gradients_match_stacked_reference(tester, height, width):
    config = tester.get_config(num_hidden_layers=3, num_attention_heads=2, aaf_reduction=2)
    model = WeakTrForCAM(config).train()
    for parameter in model.adaptive_attention_fusion.parameters():
        torch.nn.init.normal_(parameter, std=0.5)  # head weights well away from a constant
    pixel_values = tester.prepare_pixel_values(2, height, width)
    labels = tester.prepare_cam_labels(2)

    outputs = model(pixel_values, labels=labels, output_attentions=True)
    cross, fine_cam = _stacked_fine_cam(outputs.attentions, outputs.head_weights, outputs.coarse_cam, 3)
    assert outputs.head_weights.std() > 1e-3
    torch.testing.assert_close(outputs.cross_attention, cross, **MAP_TOLERANCE)
    torch.testing.assert_close(outputs.fine_cam, fine_cam, **MAP_TOLERANCE)

    fusion_parameters = list(model.adaptive_attention_fusion.parameters())
    reference_loss = F.multilabel_soft_margin_loss(fine_cam.mean(dim=(2, 3)), labels)
    torch.testing.assert_close(outputs.fine_loss, reference_loss, **TOLERANCE)
    expected = torch.autograd.grad(reference_loss, fusion_parameters, retain_graph=True)
    gradients = torch.autograd.grad(outputs.fine_loss, fusion_parameters)
    for gradient, reference in zip(gradients, expected, strict=True):
        assert reference.abs().max() > 0
        torch.testing.assert_close(gradient, reference, **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile vs eager
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Dynamo caches guard on the model object; reset so earlier tests' compilations do not count against limits."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tensor_fields(output):
    return {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("kind", ["cam", "segmentation"])
def test_compiled_forward_matches_eager_in_one_graph_at_two_input_sizes(tester, fresh_dynamo, kind):
    if kind == "cam":
        model = WeakTrForCAM(tester.get_config()).eval()
    else:
        model = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for height, width in [(32, 32), (40, 24)]:  # the training grid, then a resized position table
        pixel_values = tester.prepare_pixel_values(2, height, width)
        with torch.no_grad():
            expected, actual = _tensor_fields(model(pixel_values)), _tensor_fields(compiled(pixel_values))
        assert expected.keys() == actual.keys() and "logits" in actual
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, **TOLERANCE, msg=name)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("kind", ["cam", "segmentation"])
def test_compiled_training_step_matches_eager(tester, fresh_dynamo, kind):
    if kind == "cam":
        config = tester.get_config()
        labels = tester.prepare_cam_labels(2)
        model_class = WeakTrForCAM
    else:
        # Clipping on from the first step, so its branch is compiled too; dropout off for determinism.
        config = tester.get_segmentation_config(decoder_hidden_dropout_prob=0.0, clip_start_value=10.0)
        labels = tester.prepare_segmentation_labels(2)
        model_class = WeakTrForSemanticSegmentation
    eager = model_class(config).train()
    compiled_model = model_class(config).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager")
    pixel_values = tester.prepare_pixel_values(2)

    eager_loss = eager(pixel_values, labels=labels).loss
    compiled_loss = compiled(pixel_values, labels=labels).loss
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, **TOLERANCE)
    eager_parameters = dict(eager.named_parameters())
    for name, parameter in compiled_model.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, eager_parameters[name].grad, **TOLERANCE, msg=name)
