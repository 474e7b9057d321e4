"""Segmentation metrics. `evaluate.load(METRIC_PATH)` loads the mean-IoU metric module offline.

The arithmetic lives in `mean_iou.py`, which `evaluate` also copies and imports on its own; importing it from there
keeps one implementation for both the `evaluate` metric and the streaming `ConfusionMatrix`.
"""

from pathlib import Path

from .mean_iou import ConfusionMatrix, confusion_matrix, metrics_from_confusion_matrix

METRIC_PATH = str(Path(__file__).with_name("mean_iou.py"))

__all__ = ["METRIC_PATH", "ConfusionMatrix", "confusion_matrix", "metrics_from_confusion_matrix"]
