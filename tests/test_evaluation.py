"""Evaluation edge cases (the scoring itself is tested with the recipe and the metrics)."""

import pytest

from conftest import WeakTrModelTester

from weaktr_hf import WeakTrForCAM
from weaktr_hf.data import make_synthetic_split
from weaktr_hf.evaluation import evaluate_cams


def test_cam_evaluation_of_no_sample_says_so():
    model = WeakTrForCAM(WeakTrModelTester().get_config()).eval()
    dataset = make_synthetic_split("val", 2, num_classes=3, image_size=32, seed=1)

    with pytest.raises(ValueError, match="no pixel was scored: the selection holds no sample"):
        evaluate_cams(model, dataset, thresholds=(0.3, 0.5), max_samples=0, show_progress=False)
    scores = evaluate_cams(model, dataset, thresholds=(0.3, 0.5), max_samples=1, show_progress=False)
    assert 0.0 <= scores["fine_cam"]["mean_iou"] <= 1.0
