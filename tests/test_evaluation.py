"""Evaluation edge cases (the scoring itself is tested with the recipe and the metrics)."""

import datasets
import numpy as np
import PIL.Image
import pytest

from conftest import WeakTrModelTester

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation
from weaktr_hf.data import make_synthetic_split
from weaktr_hf.evaluation import evaluate_cams, evaluate_segmentation


def test_cam_evaluation_of_no_sample_says_so():
    model = WeakTrForCAM(WeakTrModelTester().get_config()).eval()
    dataset = make_synthetic_split("val", 2, num_classes=3, image_size=32, seed=1)

    with pytest.raises(ValueError, match="no pixel was scored: the selection holds no sample"):
        evaluate_cams(model, dataset, thresholds=(0.3, 0.5), max_samples=0, show_progress=False)
    scores = evaluate_cams(model, dataset, thresholds=(0.3, 0.5), max_samples=1, show_progress=False)
    assert 0.0 <= scores["fine_cam"]["mean_iou"] <= 1.0


def test_present_classes_only_restricts_each_prediction_to_the_classes_of_its_mask():
    tester = WeakTrModelTester()
    model = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    num_labels = model.config.num_labels
    rng = np.random.default_rng(3)
    everything = np.arange(24 * 24).reshape(24, 24) % num_labels  # every class present: the restriction is a no-op
    masks = [np.where(rng.random((24, 24)) < 0.5, 1, 0), everything, np.full((24, 24), 255)]
    masks[0][:2] = 255  # ignored pixels do not count as a class
    rows = [{"id": f"img{i}", "image": PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)),
             "labels": [0], "semantic_mask": PIL.Image.fromarray(mask.astype(np.uint8))}
            for i, mask in enumerate(masks)]  # fmt: skip
    dataset = datasets.Dataset.from_list(rows)

    def predictions(**kwargs):
        found = {}
        scores = evaluate_segmentation(model, dataset, window_size=16, window_stride=8, show_progress=False,
                                       on_prediction=lambda i, example, p: found.update({i: p}), **kwargs)  # fmt: skip
        return scores, found

    free_scores, free = predictions()
    told_scores, told = predictions(present_classes_only=True)

    assert set(np.unique(free[0])) - {0, 1}, "the untold model predicts a class image 0 does not hold"
    assert set(np.unique(told[0])) <= {0, 1}
    assert np.array_equal(told[1], free[1])
    assert set(np.unique(told[2])) == {0}  # a mask of ignored pixels only holds no class: background everywhere
    assert told_scores["mean_iou"] != free_scores["mean_iou"]
