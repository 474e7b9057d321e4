"""Step-2 diagnostics: the per-class training probe and the fit report (weaktr_hf.diagnostics)."""

import numpy as np
import pytest
import torch

from weaktr_hf import WeakTrForSemanticSegmentation
from weaktr_hf.data import make_synthetic_split
from weaktr_hf.diagnostics import StepTwoProbe, class_fit_report, format_fit_report, patch_grid_miou
from weaktr_hf.modeling_weaktr import clip_pixel_losses, upsample_logits


def segmentation_config(tester, **overrides):
    """Tiny step-2 config without dropout, so two forwards of the same model in training mode agree exactly."""
    overrides = {"decoder_hidden_dropout_prob": 0.0, "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0, "use_gradient_clipping": True, "clip_window_size": 16,
                 **overrides}  # fmt: skip
    return tester.get_segmentation_config(**overrides)


def test_probe_changes_neither_loss_nor_gradients(tester):
    model = WeakTrForSemanticSegmentation(segmentation_config(tester, clip_start_value=10.0)).train()
    twin = WeakTrForSemanticSegmentation(model.config).train()
    twin.load_state_dict(model.state_dict())
    pixel_values, labels = tester.prepare_pixel_values(), tester.prepare_segmentation_labels()
    probe = StepTwoProbe().attach(model)

    probed = model(pixel_values=pixel_values, labels=labels).loss
    probed.backward()
    plain = twin(pixel_values=pixel_values, labels=labels).loss
    plain.backward()

    assert torch.equal(probed, plain)
    for (name, parameter), twin_parameter in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(parameter.grad, twin_parameter.grad), name
    assert len(probe.rows) == 1 and {"embedding_grad", "patch_grad", "logit_grad"} <= set(probe.rows[0])
    probe.detach()
    model(pixel_values=pixel_values, labels=labels)
    assert len(probe.rows) == 1  # detached: nothing more recorded


def test_probe_counts_clipped_pixels_and_small_objects_per_class(tester):
    config = segmentation_config(tester, clip_start_value=10.0)  # clipping on from the first step
    model = WeakTrForSemanticSegmentation(config).train()
    pixel_values = tester.prepare_pixel_values(batch_size=2)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, :16, :16] = 1  # 256 px: four patches
    labels[1, :5, :5] = 2  # 25 px: less than one 8 x 8 patch
    labels[1, 20:, 20:] = 255
    probe = StepTwoProbe().attach(model)

    outputs = model(pixel_values=pixel_values, labels=labels)
    outputs.loss.backward()
    row = probe.rows[0]

    assert row["pixels"].tolist() == [2 * 1024 - 256 - 25 - 144, 256, 25, 0]
    assert row["present"].tolist() == [2, 1, 1, 0]
    assert row["small"].tolist() == [0, 0, 1, 0]
    assert torch.isclose(row["share"].sum(), torch.tensor(1.0))
    logits = upsample_logits(outputs.logits.detach(), (32, 32), config.patch_size)
    losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    clipped = clip_pixel_losses(losses, labels != 255, 10.0, 16) < losses
    expected = [clipped[labels == label].float().mean().item() for label in (0, 1, 2)]
    assert row["clipped"][:3].tolist() == pytest.approx(expected)
    assert 0 < sum(expected) and row["clipped"][3] == 0  # something is clipped; an absent class has no share


def test_probe_without_clipping_reports_nothing_clipped(tester):
    model = WeakTrForSemanticSegmentation(segmentation_config(tester, use_gradient_clipping=False)).train()
    probe = StepTwoProbe().attach(model)
    model(pixel_values=tester.prepare_pixel_values(), labels=tester.prepare_segmentation_labels()).loss.backward()
    assert probe.rows[0]["clipped"].sum() == 0 and probe.rows[0]["clipping_on"] == 0


def test_probe_summary_averages_rows_per_epoch(tester):
    model = WeakTrForSemanticSegmentation(segmentation_config(tester)).train()
    probe = StepTwoProbe().attach(model)
    for seed in range(3):
        labels = tester.prepare_segmentation_labels(seed=seed)
        model(pixel_values=tester.prepare_pixel_values(seed=seed), labels=labels).loss.backward()
    epochs = probe.summary(steps_per_epoch=2)

    assert [epoch["updates"] for epoch in epochs] == [2, 1]
    first = torch.stack([row["loss"] for row in probe.rows[:2]]).double().mean(0)
    assert epochs[0]["loss"] == pytest.approx(first.tolist())
    assert epochs[1]["present"] == probe.rows[2]["present"].double().tolist()


def background_only_model(tester):
    """A segmenter whose class LayerNorm outputs only its bias: it predicts background everywhere."""
    model = WeakTrForSemanticSegmentation(segmentation_config(tester)).eval()
    with torch.no_grad():
        model.decoder.mask_norm.weight.zero_()
        model.decoder.mask_norm.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    return model


def test_fit_report_warns_for_classes_the_segmenter_never_predicts(tester):
    model = background_only_model(tester)
    train = make_synthetic_split("train", 4, num_classes=3, image_size=32, seed=3)  # its masks stand for pseudo-labels
    val = make_synthetic_split("val", 3, num_classes=3, image_size=32, seed=3)

    report = class_fit_report(model, train, val, window_size=32, window_stride=32)

    masks = np.stack([np.asarray(mask) for mask in train["semantic_mask"]])
    background = (masks == 0).sum() / (masks != 255).sum()
    rows = {row["name"]: row for row in report["classes"]}
    assert rows["background"]["fit_iou"] == pytest.approx(background)  # all predicted background: IoU = its share
    assert rows["background"]["fit_predicted_share"] == 1.0
    present = [name for name, row in rows.items() if name != "background" and row["pseudo_label_share"] > 0]
    assert present and len(report["warnings"]) == len(present)
    for name, warning in zip(present, report["warnings"]):
        assert f"class {name!r}" in warning and "never" not in warning and "did not learn it" in warning
    text = format_fit_report(report)
    assert text.count("WARNING") == len(present) and "val IoU" in text


def test_fit_report_rejects_class_names_of_the_wrong_length(tester):
    model = background_only_model(tester)
    train = make_synthetic_split("train", 1, num_classes=3, image_size=32, seed=3)
    with pytest.raises(ValueError, match="class_names has 2 names but the model has 4 labels"):
        class_fit_report(model, train, None, window_size=32, window_stride=32, class_names=["background", "a"])


def test_patch_grid_keeps_what_a_patch_can_hold_and_loses_thinner_objects():
    labels = np.random.default_rng(0).integers(0, 3, (16, 24))
    assert patch_grid_miou([(labels, labels)], 3, patch_size=1)["mean_iou"] == 1.0  # 1-px patches: nothing lost

    halves = np.zeros((64, 64), dtype=np.int64)
    halves[:, :32] = 1  # on patch boundaries
    assert patch_grid_miou([(halves, halves)], 2, patch_size=8)["per_category_iou"].tolist() == [1.0, 1.0]

    line = np.zeros((64, 64), dtype=np.int64)
    line[:, 8:10] = 1  # 2 px wide: a quarter of each 8-px patch it crosses
    single = patch_grid_miou([(line, line)], 2, patch_size=8)["per_category_iou"]
    assert single[1] == 0.0 and single[0] == pytest.approx(62 / 64)
    enlarged = patch_grid_miou([(line, line)], 2, patch_size=8, scales=(4.0,))["per_category_iou"]
    assert enlarged.tolist() == [1.0, 1.0]  # at 4x the line fills a column of patches


def test_patch_grid_counts_ignored_labels_as_no_class_and_skips_ignored_truth():
    truth = np.zeros((16, 16), dtype=np.int64)
    truth[:, 8:] = 1
    label = truth.copy()
    label[:, 8:] = 255  # an ignored half: no class there, so background's share wins
    scores = patch_grid_miou([(label, truth)], 2, patch_size=8)
    assert scores["per_category_iou"].tolist() == [0.5, 0.0]
    truth[:, 8:] = 255  # now those pixels are not scored
    assert patch_grid_miou([(label, truth)], 2, patch_size=8)["per_category_iou"][0] == 1.0


def test_patch_grid_rejects_bad_labels():
    truth = np.zeros((8, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="outside 0..1"):
        patch_grid_miou([(truth + 2, truth)], 2, patch_size=8)
    with pytest.raises(ValueError, match="shape"):
        patch_grid_miou([(truth[:4], truth)], 2, patch_size=8)
    with pytest.raises(ValueError, match="scales positive"):
        patch_grid_miou([(truth, truth)], 2, patch_size=8, scales=(0.0,))
