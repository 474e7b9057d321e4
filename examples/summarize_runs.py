#!/usr/bin/env python
"""Mean and spread over seeds of `examples/train.py` runs, as the Markdown table the README quotes.

    python examples/summarize_runs.py default=runs/demo-s42,runs/demo-s43,runs/demo-s44 \
        eight-classes=runs/8c-s42,runs/8c-s43,runs/8c-s44

Each argument is `LABEL=RUN_DIR[,RUN_DIR...]`, one column per label; a cell is `mean ± standard deviation (n)` of
the runs' `all_results.json` values in mIoU %, with the minimum and maximum when there are several runs.
"""

import argparse
import json
import os

import numpy as np

from weaktr_hf.diagnostics import dropped_classes

ROWS = (
    ("colour-threshold baseline (val)", "trivial_baseline_miou"),
    ("coarse CAM (64 train images)", "coarse_cam_miou"),
    ("fine CAM (the paper's)", "fine_cam_miou"),
    ("cross-attention CAM", "cross_attention_miou"),
    ("pseudo-labels, no CRF (train)", "pseudo_label_miou"),
    ("pseudo-labels, CRF (train)", "pseudo_label_crf_miou"),
    ("segmentation, single scale (val)", "seg_val_miou"),
    ("segmentation, multi-scale + flip (val)", "seg_val_miou_ms_flip"),
    ("segmentation minus baseline", "minus_baseline"),
    ("segmentation minus CRF pseudo-labels", "minus_pseudo_labels"),
    ("wall time of the run (s)", "seconds"),
)
# Per run, not averaged: the classes whose CRF pseudo-labels reach IoU 0.2 against the truth (train) but whose
# segmenter IoU on val (multi-scale + flip) stays under 0.1, i.e. classes step 2 dropped.
DROPPED_ROW = "classes dropped by step 2 (pseudo-labels >= 0.2, segmenter < 0.1), per run"


def difference(results, key, minus):
    if results.get(key) is None or results.get(minus) is None:
        return None
    return results[key] - results[minus]


def run_dropped_classes(results):
    pseudo, segmenter = results.get("pseudo_label_crf_per_class_iou"), results.get("seg_val_per_class_iou")
    return dropped_classes(pseudo, segmenter) if pseudo and segmenter else None


def read_run(folder):
    with open(os.path.join(folder, "all_results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    results["seconds"] = sum(value for key, value in results.items() if key.endswith("_stage_seconds"))
    results["minus_baseline"] = difference(results, "seg_val_miou_ms_flip", "trivial_baseline_miou")
    results["minus_pseudo_labels"] = difference(results, "seg_val_miou_ms_flip", "pseudo_label_crf_miou")
    return results


def cell(values, percent=True):
    values = np.asarray([v for v in values if v is not None], dtype=float) * (100 if percent else 1)
    if not len(values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} (1)"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f} ({len(values)}; {values.min():.1f}-{values.max():.1f})"


def table(columns):
    labels = list(columns)
    lines = ["| mIoU % (background included) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, key in ROWS:
        cells = []
        for label in labels:
            cells.append(cell([r.get(key) for r in columns[label]], percent=key != "seconds"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    dropped = []
    for label in labels:
        per_run = [run_dropped_classes(r) for r in columns[label]]
        dropped.append("-" if all(d is None for d in per_run) else
                       "; ".join("?" if d is None else (", ".join(d) or "none") for d in per_run))
    lines.append(f"| {DROPPED_ROW} | " + " | ".join(dropped) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("columns", nargs="+", help="LABEL=RUN_DIR[,RUN_DIR...]")
    args = parser.parse_args(argv)
    columns = {}
    for item in args.columns:
        label, _, folders = item.partition("=")
        if not folders:
            parser.error(f"expected LABEL=RUN_DIR[,RUN_DIR...], got {item!r}.")
        columns[label] = [read_run(folder) for folder in folders.split(",")]
    print(table(columns))


if __name__ == "__main__":
    main()
