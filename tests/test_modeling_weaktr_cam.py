"""WeakTrForCAM (step 1): output fields, loss, bad inputs, Adaptive Attention Fusion order, parity with an
independent re-implementation of the authors' forward, gradient isolation of the fine-CAM loss, training."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weaktr_hf import WeakTrCAMOutput, WeakTrForCAM
from weaktr_hf.modeling_weaktr import WeakTrAdaptiveAttentionFusion

pytestmark = pytest.mark.usefixtures("single_thread")

CAM_FIELDS = ("logits", "coarse_logits", "fine_logits", "coarse_cam", "fine_cam", "cross_attention", "head_weights")


def build_model(tester, **overrides):
    return WeakTrForCAM(tester.get_config(**overrides)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Output fields
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, height, width", [(1, 32, 32), (3, 32, 32), (1, 24, 40), (3, 48, 32)])
def test_output_shapes_and_dtypes(tester, batch_size, height, width):
    model = build_model(tester)
    pixel_values = tester.prepare_pixel_values(batch_size, height, width)
    labels = tester.prepare_cam_labels(batch_size)
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)

    num_labels, grid = model.config.num_labels, (height // 8, width // 8)
    expected = {
        "logits": (batch_size, num_labels),
        "coarse_logits": (batch_size, num_labels),
        "fine_logits": (batch_size, num_labels),
        "coarse_cam": (batch_size, num_labels, *grid),
        "fine_cam": (batch_size, num_labels, *grid),
        "cross_attention": (batch_size, num_labels, *grid),
        "head_weights": (batch_size, 2 * 4),
        "loss": (),
        "class_loss": (),
        "coarse_loss": (),
        "fine_loss": (),
    }
    assert isinstance(outputs, WeakTrCAMOutput)
    for name, shape in expected.items():
        value = getattr(outputs, name)
        assert tuple(value.shape) == shape, name
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    assert outputs.hidden_states is None and outputs.attentions is None


def test_cam_statistics_have_expected_ranges(tester):
    model = build_model(tester)
    with torch.no_grad():
        outputs = model(tester.prepare_pixel_values(2, 24, 40))
    assert ((outputs.head_weights > 0) & (outputs.head_weights < 1)).all()  # sigmoid
    assert (outputs.cross_attention >= 0).all()  # averaged softmax probabilities
    torch.testing.assert_close(outputs.coarse_logits, outputs.coarse_cam.mean(dim=(2, 3)))
    torch.testing.assert_close(outputs.fine_logits, outputs.fine_cam.mean(dim=(2, 3)))


def test_output_attentions_returns_each_layers_probabilities(tester):
    model = build_model(tester)
    pixel_values = tester.prepare_pixel_values(2, 24, 40)
    with torch.no_grad():
        outputs = model(pixel_values, output_attentions=True)
    tokens = 3 + 3 * 5
    assert len(outputs.attentions) == 2
    for attention in outputs.attentions:
        assert attention.shape == (2, 4, tokens, tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, tokens))


def test_output_hidden_states_are_embeddings_plus_each_layer_without_final_norm(tester):
    model = build_model(tester)
    with torch.no_grad():
        outputs = model(tester.prepare_pixel_values(3, 32, 24), output_hidden_states=True)
    assert len(outputs.hidden_states) == 3
    assert all(state.shape == (3, 3 + 4 * 3, 32) for state in outputs.hidden_states)
    # Class-token scores come from the un-normalised final class tokens (the authors never apply the final norm).
    torch.testing.assert_close(outputs.logits, outputs.hidden_states[-1][:, :3].mean(-1))


def test_return_dict_false_gives_tuple_in_field_order(tester):
    model = build_model(tester)
    pixel_values, labels = tester.prepare_pixel_values(2), tester.prepare_cam_labels(2)
    with torch.no_grad():
        as_dict = model(pixel_values, labels=labels)
        as_tuple = model(pixel_values, labels=labels, return_dict=False)
        without_labels = model(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple())
    for left, right in zip(as_tuple, as_dict.to_tuple()):
        torch.testing.assert_close(left, right)
    assert len(without_labels) == len(CAM_FIELDS)
    for value, name in zip(without_labels, CAM_FIELDS):
        torch.testing.assert_close(value, getattr(as_dict, name))


def test_attention_is_eager_whatever_the_attn_implementation(tester):
    sdpa = WeakTrForCAM._from_config(tester.get_config(), attn_implementation="sdpa").eval()
    eager = WeakTrForCAM._from_config(tester.get_config(), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    pixel_values = tester.prepare_pixel_values(2)
    with torch.no_grad():
        from_sdpa, from_eager = sdpa(pixel_values, output_attentions=True), eager(pixel_values, output_attentions=True)
    for name in CAM_FIELDS:
        torch.testing.assert_close(getattr(from_sdpa, name), getattr(from_eager, name))
    assert len(from_sdpa.attentions) == 2


def test_loss_is_sum_of_three_multilabel_soft_margin_losses(tester):
    model = build_model(tester)
    pixel_values, labels = tester.prepare_pixel_values(3), tester.prepare_cam_labels(3)
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
    terms = [F.multilabel_soft_margin_loss(getattr(outputs, name), labels) for name in CAM_FIELDS[:3]]
    torch.testing.assert_close(outputs.loss, terms[0] + terms[1] + terms[2])
    torch.testing.assert_close(outputs.class_loss, terms[0])
    torch.testing.assert_close(outputs.coarse_loss, terms[1])
    torch.testing.assert_close(outputs.fine_loss, terms[2])


def test_class_id_labels_are_one_hot_rows_of_the_multilabel_loss(tester):
    model = build_model(tester)
    pixel_values, class_ids = tester.prepare_pixel_values(3), torch.tensor([0, 2, 1])
    with torch.no_grad():
        from_ids = model(pixel_values, labels=class_ids)
        from_rows = model(pixel_values, labels=F.one_hot(class_ids, 3).float())
    torch.testing.assert_close(from_ids.loss, from_rows.loss)


@pytest.mark.parametrize("problem_type", ["single_label_classification", "regression"])
def test_problem_types_of_transformers_image_classifiers(tester, problem_type):
    model = build_model(tester, problem_type=problem_type)
    pixel_values = tester.prepare_pixel_values(3)
    labels = torch.tensor([0, 2, 1]) if problem_type == "single_label_classification" else torch.rand(3, 3)
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
    loss_fn = F.cross_entropy if problem_type == "single_label_classification" else F.mse_loss
    terms = [loss_fn(getattr(outputs, name), labels) for name in CAM_FIELDS[:3]]
    torch.testing.assert_close(outputs.loss, terms[0] + terms[1] + terms[2])


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_class_ids_out_of_range_raise(tester, problem_type):
    model = build_model(tester, problem_type=problem_type)
    with pytest.raises(ValueError, match=r"class ids outside \[0, 3\)"):
        model(tester.prepare_pixel_values(2), labels=torch.tensor([0, 3]))


def test_one_class_integer_labels_are_refused_as_ambiguous_not_read_as_class_ids(tester):
    # With one class a class id is always 0: flags tensor([0, 0]) (two background-only images) would train as present.
    model = build_model(tester, id2label={0: "cat"})
    pixel_values = tester.prepare_pixel_values(2)

    for flags in (torch.tensor([0, 0]), torch.tensor([1, 0])):
        with pytest.raises(ValueError, match=r"ambiguous with one foreground class .* shape \(batch_size, 1\)"):
            model(pixel_values, labels=flags)
    with torch.no_grad():
        absent = model(pixel_values, labels=torch.zeros(2, 1)).class_loss
        present = model(pixel_values, labels=torch.ones(2, 1)).class_loss
    assert not torch.isclose(absent, present)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4), (2, 2), (3, 3), (2,)])
def test_labels_of_wrong_shape_raise(tester, shape):
    model = build_model(tester)
    with pytest.raises(ValueError, match=r"labels must be multi-hot of shape \(batch_size, num_labels\) = \(2, 3\)"):
        model(tester.prepare_pixel_values(2), labels=torch.ones(shape))


def test_wrong_channel_count_raises_naming_the_shape(tester):
    model = build_model(tester)
    expected = r"pixel_values must have shape \(batch_size, 3, height, width\).*\(1, 1, 32, 32\)"
    with pytest.raises(ValueError, match=expected):
        model(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("height, width", [(30, 32), (32, 36), (33, 33)])
def test_side_not_multiple_of_patch_raises_naming_the_size(tester, height, width):
    model = build_model(tester)
    with pytest.raises(ValueError, match=rf"{height}x{width} is not a multiple of the patch size 8"):
        model(torch.zeros(1, 3, height, width))


# ---------------------------------------------------------------------------------------------------------------------
# Adaptive Attention Fusion: channel order
# ---------------------------------------------------------------------------------------------------------------------


class FixedHeadWeights(nn.Module):
    """Stands in for the fusion's weight network: always returns the given per-channel weights."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def forward(self, features):
        return self.weights.expand(features.shape[0], -1)


def test_head_features_are_head_major_with_head_fastest_along_hidden(tester):
    config = tester.get_config()  # 2 layers, 4 heads, width 32 -> head dim 8
    fusion = WeakTrAdaptiveAttentionFusion(config)
    num_layers, num_heads, head_dim, tokens = 2, 4, 8, 5
    for layer in range(num_layers):
        for head in range(num_heads):
            outputs = [torch.zeros(1, tokens, 32) for _ in range(num_layers)]
            # Head `head` owns hidden channels head, head + heads, head + 2 * heads, ... (D viewed as (D/heads, heads)).
            outputs[layer][0, 2, head::num_heads] = torch.arange(1.0, head_dim + 1)
            features = fusion.head_features(outputs)

            assert features.shape == (1, num_layers * num_heads, head_dim)
            nonzero = features.abs().sum(-1)[0].nonzero().flatten().tolist()
            assert nonzero == [head * num_layers + layer], (layer, head)
            torch.testing.assert_close(features[0, head * num_layers + layer], torch.arange(1.0, head_dim + 1))


def test_head_features_avg_pooling_averages_over_tokens(tester):
    fusion = WeakTrAdaptiveAttentionFusion(tester.get_config(aaf_pooling="avg"))
    outputs = [torch.zeros(1, 5, 32), torch.zeros(1, 5, 32)]
    outputs[0][0, 1, 3::4] = 5.0  # layer 0, head 3
    features = fusion.head_features(outputs)
    torch.testing.assert_close(features[0, 3 * 2 + 0], torch.full((8,), 1.0))
    assert features.abs().sum() == 8.0


def test_fusion_weight_of_one_channel_selects_that_layer_and_head(tester):
    fusion = WeakTrAdaptiveAttentionFusion(tester.get_config())
    num_layers, num_heads, tokens = 2, 4, 6
    attentions = [torch.rand(2, num_heads, tokens, tokens) for _ in range(num_layers)]
    features = [torch.randn(2, tokens, 32) for _ in range(num_layers)]
    layer, head = 1, 2
    weights = torch.zeros(1, num_layers * num_heads)
    weights[0, head * num_layers + layer] = 1.0
    fusion.attn_head_ffn = FixedHeadWeights(weights)

    fused, head_weights = fusion(attentions, features)
    torch.testing.assert_close(fused, attentions[layer][:, head] / (num_layers * num_heads))
    torch.testing.assert_close(head_weights, weights.expand(2, -1))


def test_fused_map_is_mean_of_weighted_maps_stacked_the_authors_way(tester):
    fusion = WeakTrAdaptiveAttentionFusion(tester.get_config())
    for parameter in fusion.parameters():
        nn.init.normal_(parameter, std=0.5)
    attentions = [torch.rand(2, 4, 7, 7).softmax(-1) for _ in range(2)]
    features = [torch.randn(2, 7, 32) for _ in range(2)]
    fused, head_weights = fusion(attentions, features)

    stacked = torch.stack(attentions).permute(1, 2, 0, 3, 4).reshape(2, 4 * 2, 7, 7)  # (L,B,H,T,T) -> (B, H*L, T, T)
    expected = (head_weights[:, :, None, None] * stacked).mean(1)
    torch.testing.assert_close(fused, expected)
    assert head_weights.std() > 1e-3  # the weights really differ between channels


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the authors' step-1 forward, written independently from our state dict
# ---------------------------------------------------------------------------------------------------------------------


def authors_cam_forward(state_dict, config, pixel_values):
    """WeakTr step 1 as the authors' `WeakTr.forward` computes it, from a timm-named state dict.

    Kept deliberately close to their tensor layout: stacked (L, B, ...) attention maps and features, the
    DINO-style scale-factor position interpolation, per-channel pooling, and the matmul refinement.
    """
    params = {key.removeprefix("weaktr."): value for key, value in state_dict.items()}
    num_classes, dim, heads = config.num_labels, config.hidden_size, config.num_attention_heads
    patch = config.patch_size
    batch_size, _, height, width = pixel_values.shape
    rows, cols = height // patch, width // patch

    tokens = F.conv2d(pixel_values, params["patch_embed.proj.weight"], params["patch_embed.proj.bias"], stride=patch)
    tokens = torch.cat([params["cls_token"].expand(batch_size, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
    pos_embed = params["pos_embed"]
    train_patches = pos_embed.shape[1] - num_classes
    if not (rows * cols == train_patches and height == width):
        side = int(math.sqrt(train_patches))
        table = pos_embed[:, num_classes:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        pos_embed = torch.cat([pos_embed[:, :num_classes], table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    x = tokens + pos_embed

    attention_maps, attention_features = [], []
    for i in range(config.num_hidden_layers):
        p = {key.removeprefix(f"blocks.{i}."): value for key, value in params.items() if key.startswith(f"blocks.{i}.")}
        normed = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"], config.layer_norm_eps)
        qkv = F.linear(normed, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.reshape(batch_size, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        branch = F.linear((attention @ v).transpose(1, 2).reshape(batch_size, -1, dim), p["attn.proj.weight"],
                          p["attn.proj.bias"])  # fmt: skip
        x = x + branch
        normed = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"], config.layer_norm_eps)
        x = x + F.linear(F.gelu(F.linear(normed, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])  # fmt: skip
        attention_maps.append(attention)
        attention_features.append(branch)

    class_tokens, patch_tokens = x[:, :num_classes], x[:, num_classes:]
    patch_map = patch_tokens.reshape(batch_size, rows, cols, dim).permute(0, 3, 1, 2).contiguous()
    coarse_cam = F.conv2d(patch_map, params["head.weight"], params["head.bias"], padding=1)

    num_layers = config.num_hidden_layers
    maps = torch.stack(attention_maps)  # (L, B, heads, T, T)
    total = maps.shape[-1]
    maps = maps.permute(1, 2, 0, 3, 4).reshape(batch_size, heads * num_layers, total, total)
    feats = torch.stack(attention_features)  # (L, B, T, D)
    feats = feats.view(num_layers, batch_size, total, -1, heads).permute(1, 4, 0, 2, 3)
    feats = feats.reshape(batch_size, heads * num_layers, total, -1)
    pooled = feats.amax(dim=2) if config.aaf_pooling == "max" else feats.mean(dim=2)
    a = {key.removeprefix("adaptive_attention_fusion."): v for key, v in params.items()}
    scores = F.linear(F.linear(pooled, a["attn_feat_ffn.0.weight"], a["attn_feat_ffn.0.bias"]),
                      a["attn_feat_ffn.1.weight"], a["attn_feat_ffn.1.bias"]).squeeze(-1)  # fmt: skip
    head_weights = torch.sigmoid(F.linear(F.relu(F.linear(scores, a["attn_head_ffn.0.weight"])),
                                          a["attn_head_ffn.2.weight"]))  # fmt: skip
    fused = (maps * head_weights[:, :, None, None]).mean(1)

    cross = fused[:, :num_classes, num_classes:].reshape(batch_size, num_classes, rows, cols)
    cams = cross * F.relu(coarse_cam)
    patch_attention = fused[:, num_classes:, num_classes:]
    fine_cam = torch.matmul(patch_attention.unsqueeze(1), cams.reshape(batch_size, num_classes, -1, 1))
    fine_cam = fine_cam.reshape(batch_size, num_classes, rows, cols)
    return {
        "logits": class_tokens.mean(-1),
        "coarse_logits": coarse_cam.mean(dim=(2, 3)),
        "fine_logits": fine_cam.mean(dim=(2, 3)),
        "coarse_cam": coarse_cam,
        "fine_cam": fine_cam,
        "cross_attention": cross,
        "head_weights": head_weights,
    }


@pytest.mark.parametrize(
    "height, width, pooling",
    [(32, 32, "max"), (40, 40, "max"), (24, 48, "max"), (40, 32, "avg")],
    ids=["training-grid", "square-new-grid", "non-square", "non-square-avg-pool"],
)
def test_outputs_match_independent_reference_of_authors_forward(tester, height, width, pooling):
    model = build_model(tester, aaf_pooling=pooling)
    # Larger-than-init weights so attention is far from uniform, head weights spread over (0, 1), position rows
    # matter, and every output is well above the tolerance.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            large = name.startswith("adaptive_attention_fusion.") or name == "weaktr.pos_embed"
            parameter.normal_(0.0, 1.0 if large else 0.15)
    pixel_values = tester.prepare_pixel_values(2, height, width)
    with torch.no_grad():
        outputs = model(pixel_values)
        expected = authors_cam_forward(model.state_dict(), model.config, pixel_values)

    for name, reference in expected.items():
        scale = reference.abs().max().item()
        assert scale > 1e-2, name  # a meaningful comparison, not two near-zero tensors
        difference = (getattr(outputs, name) - reference).abs().max().item()
        # Below 1e-5, and relative to the field's scale: fine CAMs are ~0.04, coarse CAMs ~10.
        assert difference < 1e-5 * max(scale, 1.0) and difference < 1e-5 * scale + 1e-7, (name, difference, scale)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients and training
# ---------------------------------------------------------------------------------------------------------------------


def test_fine_cam_loss_only_trains_fusion(tester):
    model = build_model(tester).train()
    outputs = model(tester.prepare_pixel_values(2, 24, 40), labels=tester.prepare_cam_labels(2))
    outputs.fine_loss.backward()

    for name, parameter in model.named_parameters():
        if name.startswith("adaptive_attention_fusion."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None or not parameter.grad.any(), name


def test_fine_cam_scale_scales_the_fine_outputs_only(tester):
    """The demo's option: a factor on the fine CAM and its score; every other output is untouched, and the default
    (1.0) is the paper's model."""
    assert tester.get_config().fine_cam_scale == 1.0
    torch.manual_seed(0)
    plain = build_model(tester)
    scaled = WeakTrForCAM(tester.get_config(fine_cam_scale=16.0)).eval()
    scaled.load_state_dict(plain.state_dict())
    pixel_values, labels = tester.prepare_pixel_values(2, 24, 40), tester.prepare_cam_labels(2)
    with torch.no_grad():
        first, second = plain(pixel_values, labels=labels), scaled(pixel_values, labels=labels)

    torch.testing.assert_close(second.fine_cam, 16.0 * first.fine_cam)
    torch.testing.assert_close(second.fine_logits, 16.0 * first.fine_logits)
    for name in ("logits", "coarse_cam", "cross_attention", "class_loss", "coarse_loss"):
        torch.testing.assert_close(getattr(second, name), getattr(first, name))
    assert second.fine_loss != first.fine_loss
    with pytest.raises(ValueError, match="fine_cam_scale must be positive"):
        tester.get_config(fine_cam_scale=0.0)


def test_every_parameter_gets_a_finite_gradient_from_the_full_loss(tester):
    model = build_model(tester).train()
    outputs = model(tester.prepare_pixel_values(2, 24, 40), labels=tester.prepare_cam_labels(2))
    outputs.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_training_on_random_data_lowers_the_loss(tester):
    torch.manual_seed(0)
    model = WeakTrForCAM(tester.get_config()).train()
    pixel_values = tester.prepare_pixel_values(2, seed=1)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses
