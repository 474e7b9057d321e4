import socket

import numpy as np
import pytest
import torch

from weaktr_hf.metrics import METRIC_PATH, ConfusionMatrix, confusion_matrix, metrics_from_confusion_matrix

# 3x4 maps, 4 classes (class 3 appears nowhere), two ignored reference pixels and one undecided prediction (255).
REFERENCE = np.array([[0, 0, 1, 1], [0, 255, 1, 2], [2, 2, 255, 1]])
PREDICTION = np.array([[0, 1, 1, 1], [0, 2, 1, 2], [2, 0, 0, 255]])
# Counted by hand, pixel by pixel: rows = reference class, columns = predicted class 0..3, then "undecided".
HAND_MATRIX = np.array(
    [
        [2, 1, 0, 0, 0],
        [0, 3, 0, 0, 1],
        [1, 0, 2, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)
# IoU = TP / (reference + predicted - TP): class 0: 2 / (3 + 3 - 2), class 1: 3 / (4 + 4 - 3), class 2: 2 / (3 + 2 - 2).
HAND_IOU = [2 / 4, 3 / 5, 2 / 3]
HAND_ACCURACY = [2 / 3, 3 / 4, 2 / 3]


def test_confusion_matrix_matches_hand_count_with_ignore_index():
    np.testing.assert_array_equal(confusion_matrix(PREDICTION, REFERENCE, num_labels=4), HAND_MATRIX)


def test_scores_match_hand_computed_miou():
    scores = metrics_from_confusion_matrix(HAND_MATRIX)
    assert scores["mean_iou"] == pytest.approx(np.mean(HAND_IOU))
    assert scores["mean_accuracy"] == pytest.approx(np.mean(HAND_ACCURACY))
    assert scores["overall_accuracy"] == pytest.approx(7 / 10)
    np.testing.assert_allclose(scores["per_category_iou"][:3], HAND_IOU)
    np.testing.assert_allclose(scores["per_category_accuracy"][:3], HAND_ACCURACY)


def test_class_absent_everywhere_is_nan_and_skipped_but_false_positive_class_counts():
    reference = np.array([[0, 0], [1, 1]])
    prediction = np.array([[0, 2], [1, 1]])  # class 2 predicted once, never in the reference: IoU 0, not NaN
    scores = ConfusionMatrix(num_labels=4).update(prediction, reference).compute()
    iou = scores["per_category_iou"]
    assert np.isnan(iou[3])
    assert iou[2] == 0.0
    assert scores["mean_iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    filled = ConfusionMatrix(num_labels=4).update(prediction, reference).compute(nan_to_num=-1.0)
    assert filled["per_category_iou"][3] == -1.0
    assert filled["mean_iou"] == pytest.approx(scores["mean_iou"])


def test_accumulator_over_chunks_and_ranks_equals_one_shot():
    rng = np.random.default_rng(0)
    shapes = [(5, 7), (6, 4), (3, 3), (8, 2), (4, 4)]
    references = [rng.integers(0, 6, size=shape) for shape in shapes]
    predictions = [rng.integers(0, 6, size=shape) for shape in shapes]
    for reference in references:
        reference[rng.random(reference.shape) < 0.2] = 255
    one_shot = metrics_from_confusion_matrix(
        sum(confusion_matrix(p, r, num_labels=6) for p, r in zip(predictions, references))
    )

    rank0, rank1 = ConfusionMatrix(6), ConfusionMatrix(6)
    for prediction, reference in zip(predictions[:3], references[:3]):
        rank0.update(torch.from_numpy(prediction), torch.from_numpy(reference))
    rank1.update(predictions[3], references[3])
    rank1.update(predictions[4][None], references[4][None])  # a batch with a leading axis
    # `+` of accumulators, and merging a raw matrix as gathered from another process
    for combined in (rank0 + rank1, ConfusionMatrix(6).merge(rank1.matrix).merge(rank0)):
        chunked = combined.compute()
        assert chunked["mean_iou"] == pytest.approx(one_shot["mean_iou"])
        assert chunked["overall_accuracy"] == pytest.approx(one_shot["overall_accuracy"])
        np.testing.assert_allclose(chunked["per_category_iou"], one_shot["per_category_iou"])


def test_bad_labels_raise_clear_errors():
    with pytest.raises(ValueError, match="reference label 7 is outside 0..3"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 7), num_labels=4)
    with pytest.raises(ValueError, match="predicted label 9"):
        confusion_matrix(np.full((2, 2), 9), np.zeros((2, 2), int), num_labels=4)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((2, 2), int), num_labels=4)
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), num_labels=4)


def test_evaluate_load_from_package_path_works_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted while loading the local metric")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = evaluate.load(METRIC_PATH, keep_in_memory=True)
    metric.add(predictions=PREDICTION, references=REFERENCE)
    metric.add_batch(predictions=[np.array([[3]])], references=[np.array([[3]])])
    scores = metric.compute(num_labels=4, ignore_index=255)
    # the extra 1x1 image adds one correct pixel of class 3 (IoU 1) to the hand example
    assert scores["mean_iou"] == pytest.approx(np.mean(HAND_IOU + [1.0]))
    assert scores["overall_accuracy"] == pytest.approx(8 / 11)
    np.testing.assert_allclose(scores["per_category_accuracy"], HAND_ACCURACY + [1.0])
