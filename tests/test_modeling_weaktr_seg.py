"""WeakTrForSemanticSegmentation (step 2): shapes, padding, label checks, the gradient-clipping loss, overfitting."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from weaktr_hf import (
    WeakTrForCAM,
    WeakTrForSemanticSegmentation,
    clip_pixel_losses,
    semantic_segmentation_loss,
    upsample_logits,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_LABELS = 4  # background + 3 classes (conftest)


def build_model(tester, **overrides):
    return WeakTrForSemanticSegmentation(tester.get_segmentation_config(**overrides)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and padding
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, height, width",
    [(2, 32, 32), (1, 31, 31), (3, 33, 47), (1, 24, 40), (2, 9, 70)],
    ids=["even", "odd", "odd-non-square", "non-square", "thin"],
)
def test_logits_are_at_patch_resolution_of_the_padded_input(tester, batch_size, height, width):
    model = build_model(tester)
    pixel_values = tester.prepare_pixel_values(batch_size, height, width)
    labels = tester.prepare_segmentation_labels(batch_size, height, width)
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
    assert isinstance(outputs, SemanticSegmenterOutput)
    assert outputs.logits.shape == (batch_size, NUM_LABELS, -(-height // 8), -(-width // 8))
    assert outputs.logits.dtype == torch.float32
    assert outputs.loss.shape == () and torch.isfinite(outputs.loss)
    assert upsample_logits(outputs.logits, (height, width), 8).shape == (batch_size, NUM_LABELS, height, width)


def test_padding_is_cropped_without_shifting_predictions(tester):
    model = build_model(tester, use_gradient_clipping=False)
    pixel_values = tester.prepare_pixel_values(2, 27, 35)
    labels = tester.prepare_segmentation_labels(2, 27, 35)
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
        by_hand = model(F.pad(pixel_values, (0, 5, 0, 5))).logits  # zero padding bottom/right to 32 x 40

    torch.testing.assert_close(outputs.logits, by_hand)
    full = F.interpolate(by_hand, size=(32, 40), mode="bilinear", align_corners=False)
    kept = full[..., :27, :35]
    torch.testing.assert_close(upsample_logits(outputs.logits, (27, 35), 8), kept)
    expected = F.cross_entropy(kept, labels, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(outputs.loss, expected)

    # The prediction depends on position, so a crop from the other corner would give another loss.
    shifted = full[..., 5:, 5:]
    assert (shifted - kept).abs().max() > 1e-2
    assert abs(F.cross_entropy(shifted, labels, ignore_index=255, reduction="none").mean() - expected) > 1e-4


def test_output_attentions_gives_encoder_maps_decoder_maps_apart_and_same_logits(tester):
    model = build_model(tester)
    pixel_values = tester.prepare_pixel_values(2, 24, 40)
    with torch.no_grad():
        plain = model(pixel_values)
        with_maps = model(pixel_values, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(plain.logits, with_maps.logits, rtol=1e-4, atol=1e-5)
    assert plain.attentions is None and plain.decoder_attentions is None and plain.hidden_states is None
    num_patches = 3 * 5
    encoder_tokens, decoder_tokens = 1 + num_patches, num_patches + NUM_LABELS
    # Encoder layers in `attentions` (as transformers' vision models), decoder layers in `decoder_attentions`.
    encoder_shapes = [tuple(attention.shape) for attention in with_maps.attentions]
    assert encoder_shapes == [(2, 4, encoder_tokens, encoder_tokens)] * 2
    decoder_shapes = [tuple(attention.shape) for attention in with_maps.decoder_attentions]
    assert decoder_shapes == [(2, 4, decoder_tokens, decoder_tokens)] * 2
    assert [state.shape for state in with_maps.hidden_states] == [(2, 1 + num_patches, 32)] * 3


def test_return_dict_false_gives_loss_then_logits(tester):
    model = build_model(tester)
    pixel_values, labels = tester.prepare_pixel_values(2), tester.prepare_segmentation_labels(2)
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
        loss, logits = model(pixel_values, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, outputs.loss)
    torch.testing.assert_close(logits, outputs.logits)


# ---------------------------------------------------------------------------------------------------------------------
# Label checks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [NUM_LABELS, -1, 254])
def test_labels_out_of_range_raise(tester, bad_value):
    model = build_model(tester)
    labels = tester.prepare_segmentation_labels(2)
    labels[1, 3, 4] = bad_value
    with pytest.raises(ValueError, match=rf"outside \[0, {NUM_LABELS}\).*\[{bad_value}\]"):
        model(tester.prepare_pixel_values(2), labels=labels)


def test_ignore_index_is_accepted(tester):
    model = build_model(tester)
    labels = torch.full((2, 32, 32), 255, dtype=torch.long)
    labels[:, :8] = 3
    with torch.no_grad():
        assert torch.isfinite(model(tester.prepare_pixel_values(2), labels=labels).loss)


def test_float_labels_raise(tester):
    model = build_model(tester)
    with pytest.raises(ValueError, match="int64"):
        model(tester.prepare_pixel_values(2), labels=tester.prepare_segmentation_labels(2).float())


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (3, 32, 32), (32, 32)])
def test_labels_of_wrong_shape_raise(tester, shape):
    model = build_model(tester)
    with pytest.raises(ValueError, match=r"\(batch_size, height, width\)"):
        model(tester.prepare_pixel_values(2), labels=torch.zeros(shape, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# Gradient clipping (clip_pixel_losses)
# ---------------------------------------------------------------------------------------------------------------------

# A 4 x 4 loss map, windows of 2 (exact binary fractions, so every comparison is exact):
#   window means: top-left 0.375, top-right 0.25, bottom-left 0.5, bottom-right 0.1875; global mean 21 / 64.
#   caps = max(window mean, global mean): 0.375, 21/64, 0.5, 21/64.
HAND_LOSSES = [
    [0.125, 0.125, 0.25, 0.25],
    [0.125, 1.125, 0.25, 0.25],
    [0.375, 0.625, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.75],
]
HAND_CLIPPED = {(1, 1): 0.375, (2, 1): 0.5, (3, 3): 21 / 64}  # the only pixels above their cap


def hand_losses():
    return torch.tensor([HAND_LOSSES], requires_grad=True)


def test_clipping_does_nothing_before_the_start_value():
    losses = torch.tensor([HAND_LOSSES]) * 8  # mean 2.625 > 1.2
    losses.requires_grad_(True)
    clipped = clip_pixel_losses(losses, torch.ones(1, 4, 4, dtype=torch.bool), start_value=1.2, window_size=2)
    clipped.sum().backward()
    torch.testing.assert_close(clipped, losses)
    torch.testing.assert_close(losses.grad, torch.ones(1, 4, 4))


def test_clipping_caps_pixels_above_max_of_window_and_global_mean():
    losses = hand_losses()
    clipped = clip_pixel_losses(losses, torch.ones(1, 4, 4, dtype=torch.bool), start_value=1.2, window_size=2)
    expected = torch.tensor([HAND_LOSSES])
    for (row, col), cap in HAND_CLIPPED.items():
        expected[0, row, col] = cap
    torch.testing.assert_close(clipped, expected, rtol=0, atol=0)


def test_clipping_on_a_map_smaller_than_the_window_warns_that_it_is_global_clipping():
    from transformers.testing_utils import CaptureLogger

    import weaktr_hf.modeling_weaktr as modeling

    with CaptureLogger(modeling.logger) as captured:
        clipped = clip_pixel_losses(hand_losses()[:, :3], torch.ones(1, 3, 4, dtype=torch.bool), 1.2, window_size=7)
    assert "3x4 label map is smaller than clip_window_size 7" in captured.out
    global_mean = torch.tensor(HAND_LOSSES)[:3].mean()
    torch.testing.assert_close(clipped.detach(), torch.tensor(HAND_LOSSES)[None, :3].clamp(max=global_mean))


def test_clipped_pixels_get_no_gradient_and_others_keep_theirs():
    losses = hand_losses()
    clip_pixel_losses(losses, torch.ones(1, 4, 4, dtype=torch.bool), start_value=1.2, window_size=2).sum().backward()
    expected = torch.ones(1, 4, 4)
    for row, col in HAND_CLIPPED:
        expected[0, row, col] = 0.0
    torch.testing.assert_close(losses.grad, expected, rtol=0, atol=0)


def authors_gradient_clipping(pixel_losses, start_value, window_size):
    """The authors' GradientClipping: all-pixel means, batch-averaged map, symmetric padding of H mod window."""
    detached = pixel_losses.detach()
    mean = detached.mean()
    if mean > start_value:
        return pixel_losses
    batch_size, height, _ = detached.shape
    local = F.avg_pool2d(detached.mean(0, keepdim=True).unsqueeze(1), kernel_size=window_size, stride=window_size,
                         padding=height % window_size, count_include_pad=False)  # fmt: skip
    local = torch.maximum(local.squeeze(1), mean).repeat_interleave(batch_size, 0)
    local = local.repeat_interleave(window_size, 1).repeat_interleave(window_size, 2)
    return torch.clamp(pixel_losses - local, max=0) + local


@pytest.mark.parametrize("batch_size, height, width, window", [(2, 24, 36, 12), (3, 16, 16, 4), (1, 30, 20, 10)])
def test_clipping_equals_authors_when_sides_are_multiples_of_the_window(batch_size, height, width, window):
    generator = torch.Generator().manual_seed(height)
    base = torch.rand(batch_size, height, width, generator=generator) ** 3 * 3  # skewed, mean about 0.75
    base[:, :, : width // 3] *= 0.2  # windows with different means
    ours_input, authors_input = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    weights = torch.rand(batch_size, height, width, generator=generator)

    ours = clip_pixel_losses(ours_input, torch.ones_like(base, dtype=torch.bool), 1.2, window)
    authors = authors_gradient_clipping(authors_input, 1.2, window)
    (ours * weights).sum().backward()
    (authors * weights).sum().backward()

    assert (authors != base).any()  # clipping really happened
    torch.testing.assert_close(ours, authors)
    torch.testing.assert_close(ours_input.grad, authors_input.grad)


def test_border_windows_count_only_real_pixels():
    # 5 x 5 with windows of 4: the last row and column form partial windows that hold only 1.0 losses. Counting the
    # window's padding cells as zeros would pull their mean to 0.25 / 0.0625 and clip them to the global mean.
    losses = torch.full((1, 5, 5), 0.125)
    losses[0, 4, :] = 1.0
    losses[0, :, 4] = 1.0
    losses.requires_grad_(True)
    clipped = clip_pixel_losses(losses, torch.ones(1, 5, 5, dtype=torch.bool), start_value=1.2, window_size=4)
    clipped.sum().backward()
    torch.testing.assert_close(clipped, losses)
    torch.testing.assert_close(losses.grad, torch.ones(1, 5, 5))


def test_partial_windows_match_hand_loop():
    generator = torch.Generator().manual_seed(1)
    losses = torch.rand(2, 7, 11, generator=generator)
    window = 4
    clipped = clip_pixel_losses(losses, torch.ones_like(losses, dtype=torch.bool), 1.2, window)
    averaged, global_mean = losses.mean(0), losses.mean()
    expected = losses.clone()
    for top in range(0, 7, window):
        for left in range(0, 11, window):
            region = (slice(top, top + window), slice(left, left + window))
            cap = torch.maximum(averaged[region].mean(), global_mean)
            expected[(slice(None), *region)] = torch.minimum(losses[(slice(None), *region)], cap)
    assert (expected != losses).any()
    torch.testing.assert_close(clipped, expected)


def test_valid_pixels_mode_averages_only_valid_pixels():
    losses = torch.tensor([[[2.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.5, 0.5]]])  # 1 x 2 x 4, windows of 2
    valid = torch.tensor([[[True, False, True, True], [True, False, True, True]]])
    # Valid mean = (2 + 0.25 + 4 * 0.5) / 6 = 4.25 / 6; window means over valid pixels: 1.125 and 0.5.
    clipped = clip_pixel_losses(losses, valid, start_value=1.2, window_size=2, average="valid_pixels")
    expected = losses.clone()
    expected[0, 0, 0] = 1.125
    expected[0, :, 2:] = 0.5
    torch.testing.assert_close(clipped, expected)
    # Counting ignored pixels as zeros (the default) gives lower means: window 0.5625, global 4.25 / 8.
    all_pixels = clip_pixel_losses(losses, valid, start_value=1.2, window_size=2)
    assert all_pixels[0, 0, 0] == 0.5625


def test_start_value_is_compared_with_the_chosen_mean():
    losses = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    valid = torch.tensor([[[True, False], [True, False]]])
    # All-pixel mean 1.0 <= 1.2 clips; valid-pixel mean 2.0 > 1.2 does not.
    assert not torch.equal(clip_pixel_losses(losses, valid, 1.2, 2), losses)
    assert torch.equal(clip_pixel_losses(losses, valid, 1.2, 2, average="valid_pixels"), losses)


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def random_logits_and_labels(tester, height=20, width=28, logit_size=(5, 7)):
    logits = torch.randn(2, NUM_LABELS, *logit_size, requires_grad=True)
    return logits, tester.prepare_segmentation_labels(2, height, width, ignore_fraction=0.3)


def test_loss_without_clipping_is_cross_entropy_over_all_pixels(tester):
    config = tester.get_segmentation_config(use_gradient_clipping=False)
    logits, labels = random_logits_and_labels(tester)
    upsampled = F.interpolate(logits, size=(20, 28), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, labels, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(semantic_segmentation_loss(logits, labels, config), expected)


def test_loss_without_clipping_in_valid_pixels_mode_is_plain_cross_entropy(tester):
    config = tester.get_segmentation_config(use_gradient_clipping=False, loss_average="valid_pixels")
    logits, labels = random_logits_and_labels(tester, logit_size=(20, 28))
    torch.testing.assert_close(semantic_segmentation_loss(logits, labels, config),
                               F.cross_entropy(logits, labels, ignore_index=255))  # fmt: skip


def test_class_average_weighs_each_present_class_alike(tester):
    """`loss_average="classes"`: the mean over the classes in the labels of each class's mean cross-entropy, so a
    class with few pixels counts as much as the background; ignored pixels count nowhere."""
    config = tester.get_segmentation_config(use_gradient_clipping=False, loss_average="classes")
    logits, labels = random_logits_and_labels(tester, logit_size=(20, 28))
    labels[labels == 2] = 1  # class 2 absent: not averaged in
    labels[0, :2, :3] = 3  # a 6-pixel class
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    per_class = [pixel_losses[labels == label].mean() for label in (0, 1, 3)]
    loss = semantic_segmentation_loss(logits, labels, config)
    torch.testing.assert_close(loss, torch.stack(per_class).mean())
    assert not torch.isclose(loss, F.cross_entropy(logits, labels, ignore_index=255))
    loss.backward()  # the small class's pixels get as much gradient in total as the background's
    grad = logits.grad.abs().sum(1)
    assert grad[labels == 3].sum() > 0.2 * grad[labels == 0].sum()


def test_class_balance_moves_from_the_pixel_mean_to_the_class_mean(tester):
    logits, labels = random_logits_and_labels(tester, logit_size=(20, 28))
    labels[0, :2, :3] = 3  # a small class
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    present = [label for label in range(NUM_LABELS) if (labels == label).any()]
    counts = torch.tensor([float((labels == label).sum()) for label in present])
    means = torch.stack([pixel_losses[labels == label].mean() for label in present])

    def loss(balance):
        config = tester.get_segmentation_config(use_gradient_clipping=False, loss_average="classes",
                                                loss_class_balance=balance)  # fmt: skip
        return semantic_segmentation_loss(logits, labels, config)

    torch.testing.assert_close(loss(0.0), F.cross_entropy(logits, labels, ignore_index=255))
    torch.testing.assert_close(loss(1.0), means.mean())
    weights = counts.sqrt()
    torch.testing.assert_close(loss(0.5), (weights * means).sum() / weights.sum())
    with pytest.raises(ValueError, match="loss_class_balance"):
        tester.get_segmentation_config(loss_class_balance=1.5)


def test_class_average_with_clipping_clips_against_valid_pixel_means(tester):
    config = tester.get_segmentation_config(clip_window_size=4, loss_average="classes", clip_start_value=5.0)
    logits, labels = random_logits_and_labels(tester, height=16, width=24, logit_size=(16, 24))
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    clipped = clip_pixel_losses(pixel_losses, labels != 255, 5.0, 4, "valid_pixels")
    assert not torch.equal(clipped, pixel_losses)
    expected = torch.stack([clipped[labels == label].mean() for label in labels.unique() if label != 255]).mean()
    torch.testing.assert_close(semantic_segmentation_loss(logits, labels, config), expected)


def test_loss_with_clipping_equals_authors_pipeline(tester):
    config = tester.get_segmentation_config(clip_window_size=4)
    logits, labels = random_logits_and_labels(tester, height=16, width=24, logit_size=(16, 24))
    with torch.no_grad():  # mostly right, confident logits: a mean loss under the start value, some large outliers
        agree = (torch.rand(labels.shape) < 0.85) & (labels != 255)
        logits.add_(4.0 * F.one_hot(labels.clamp(max=NUM_LABELS - 1), NUM_LABELS).permute(0, 3, 1, 2) * agree[:, None])
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert pixel_losses.mean() < 1.2
    expected = authors_gradient_clipping(pixel_losses, 1.2, 4).mean()
    torch.testing.assert_close(semantic_segmentation_loss(logits, labels, config), expected)
    assert expected < pixel_losses.mean()


@pytest.mark.parametrize("clipping", [True, False])
@pytest.mark.parametrize("average", ["all_pixels", "valid_pixels", "classes"])
def test_all_ignored_labels_give_finite_zero_loss_with_a_graph(tester, clipping, average):
    model = build_model(tester, use_gradient_clipping=clipping, loss_average=average).train()
    labels = torch.full((2, 32, 32), 255, dtype=torch.long)
    loss = model(tester.prepare_pixel_values(2), labels=labels).loss
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_parameter_gets_a_finite_gradient(tester):
    model = build_model(tester).train()
    outputs = model(tester.prepare_pixel_values(2, 24, 40), labels=tester.prepare_segmentation_labels(2, 24, 40))
    outputs.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_scenes():
    """4 images of a coloured box on a noisy background; the box's class (1..3) sets which channel is bright."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator) * 0.1
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    boxes = [(0, 16, 8, 24, 1), (8, 32, 0, 16, 2), (16, 24, 16, 32, 3), (0, 8, 0, 32, 1)]
    for index, (top, bottom, left, right, label) in enumerate(boxes):
        images[index, label - 1, top:bottom, left:right] += 2.0
        masks[index, top:bottom, left:right] = label
    return images, masks


def test_tiny_model_overfits_four_synthetic_scenes(tester):
    # Plain cross-entropy: clipping deliberately stops learning from the hardest pixels, the opposite of overfitting.
    model = build_model(tester, use_gradient_clipping=False, decoder_hidden_dropout_prob=0.0).train()
    images, masks = synthetic_scenes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def pixel_accuracy():
        with torch.no_grad():
            prediction = upsample_logits(model.eval()(images).logits, (32, 32), 8).argmax(1)
        model.train()
        return (prediction == masks).float().mean().item()

    accuracy_before, losses = pixel_accuracy(), []
    for _ in range(25):
        loss = model(images, labels=masks).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    accuracy_after = pixel_accuracy()
    assert losses[-1] < 0.5 * losses[0], losses
    assert accuracy_before < 0.5, accuracy_before
    assert accuracy_after > 0.95, accuracy_after


def test_auxiliary_ensemble_weight_puts_the_decoder_ensemble_in_the_logits(tester):
    """config.auxiliary_ensemble_weight w: logits without labels are log((P + w P_aux) / (1 + w)); training and
    `use_auxiliary_ensemble=False` keep the final decoder output."""
    torch.manual_seed(0)
    plain = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    ensemble = WeakTrForSemanticSegmentation(tester.get_segmentation_config(auxiliary_ensemble_weight=0.8)).eval()
    ensemble.load_state_dict(plain.state_dict())
    pixel_values = tester.prepare_pixel_values(2, 40, 24)
    with torch.no_grad():
        heads = plain(pixel_values, output_aux_logits=True)
        mixed = ensemble(pixel_values).logits
        final = ensemble(pixel_values, use_auxiliary_ensemble=False).logits
    expected = (heads.logits.softmax(1) + 0.8 * heads.aux_logits.softmax(1)) / 1.8
    torch.testing.assert_close(mixed.exp(), expected)
    torch.testing.assert_close(final, heads.logits)
    labels = torch.zeros(2, 40, 24, dtype=torch.long)
    torch.testing.assert_close(ensemble(pixel_values, labels=labels).loss, plain(pixel_values, labels=labels).loss)
    with pytest.raises(ValueError, match="auxiliary_ensemble_weight"):
        tester.get_segmentation_config(auxiliary_ensemble_weight=-1.0)


def test_auto_model_loads_the_encoder_of_a_saved_step1_model(tester, tmp_path):
    """A step-1 folder's config names WeakTrForCAM: AutoModel builds its layout (one prefix token per class, no final
    norm) and loads every encoder weight."""
    cam = WeakTrForCAM(tester.get_config()).eval()
    cam.save_pretrained(tmp_path)
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert encoder.num_prefix_tokens == cam.config.num_labels and encoder.norm is None
    pixel_values = tester.prepare_pixel_values(1, 24, 40)  # another grid: the step-1 position-table resize
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values).last_hidden_state,
                                   cam.weaktr(pixel_values).last_hidden_state)  # fmt: skip


@pytest.mark.parametrize("std", [None, 1.0])
def test_decoder_class_embeddings_start_at_the_configured_spread(tester, tmp_path, std):
    """Unset, the class embeddings start as the authors' (truncated normal, std initializer_range = 0.02); a set
    `decoder_class_embedding_std` widens them, and a saved model keeps the option and its trained values."""
    torch.manual_seed(0)
    config = tester.get_segmentation_config(decoder_hidden_size=64, decoder_num_attention_heads=4,
                                            decoder_intermediate_size=128, decoder_class_embedding_std=std)  # fmt: skip
    model = WeakTrForSemanticSegmentation(config)
    expected = config.initializer_range if std is None else std
    assert model.decoder.cls_emb.std().item() == pytest.approx(expected, rel=0.25)
    if std is not None:  # nearly orthogonal from the start, where 0.02 leaves them as small as the rest
        assert model.decoder.cls_emb.norm(dim=-1).min() > 4
    model.save_pretrained(tmp_path)
    loaded = WeakTrForSemanticSegmentation.from_pretrained(tmp_path)
    assert loaded.config.decoder_class_embedding_std == std
    torch.testing.assert_close(loaded.decoder.cls_emb, model.decoder.cls_emb)
