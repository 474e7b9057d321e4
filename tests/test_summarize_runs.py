"""examples/summarize_runs.py: the README's demo table is the mean and spread of the runs' all_results.json."""

import json

import pytest

from conftest import load_example

summarize = load_example("summarize_runs.py", "summarize_runs")


def write_run(folder, **results):
    folder.mkdir()
    (folder / "all_results.json").write_text(json.dumps(results))
    return str(folder)


def test_table_gives_mean_std_range_and_margin_over_the_baseline(tmp_path, capsys):
    first = write_run(tmp_path / "a", trivial_baseline_miou=0.40, seg_val_miou_ms_flip=0.55, coarse_cam_miou=0.5,
                      cam_stage_seconds=100.0, seg_stage_seconds=50.0)  # fmt: skip
    second = write_run(tmp_path / "b", trivial_baseline_miou=0.44, seg_val_miou_ms_flip=0.61, coarse_cam_miou=0.6,
                       cam_stage_seconds=120.0, seg_stage_seconds=40.0)  # fmt: skip
    single = write_run(tmp_path / "c", trivial_baseline_miou=0.30, seg_val_miou_ms_flip=0.25)
    summarize.main([f"two={first},{second}", f"one={single}"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()}
    # mean, sample standard deviation (ddof 1), count, min-max, in mIoU %
    assert rows["segmentation, multi-scale + flip (val)"][0] == "58.0 ± 4.2 (2; 55.0-61.0)"
    assert rows["segmentation minus baseline"][0] == "16.0 ± 1.4 (2; 15.0-17.0)"
    assert rows["segmentation minus baseline"][1].rstrip(" |") == "-5.0 (1)"
    # seconds are summed over stages and not scaled to percent
    assert rows["wall time of the run (s)"][0] == "155.0 ± 7.1 (2; 150.0-160.0)"
    # a value a run did not record is a dash, not a zero
    assert rows["fine CAM (the paper's)"][0] == "-"


def test_a_column_without_run_folders_is_refused():
    with pytest.raises(SystemExit):
        summarize.main(["default"])


def test_table_gives_the_gap_to_the_pseudo_labels_and_the_dropped_classes_per_run(tmp_path, capsys):
    pseudo = {"background": 0.9, "disc": 0.5, "cross": 0.19}
    first = write_run(tmp_path / "a", pseudo_label_crf_miou=0.53, seg_val_miou_ms_flip=0.50,
                      pseudo_label_crf_per_class_iou=pseudo,
                      seg_val_per_class_iou={"background": 0.9, "disc": 0.05, "cross": 0.0})  # fmt: skip
    second = write_run(tmp_path / "b", pseudo_label_crf_miou=0.53, seg_val_miou_ms_flip=0.56,
                       pseudo_label_crf_per_class_iou=pseudo,
                       seg_val_per_class_iou={"background": 0.9, "disc": 0.4, "cross": 0.0})  # fmt: skip
    older = write_run(tmp_path / "c", pseudo_label_crf_miou=0.5, seg_val_miou_ms_flip=0.4)
    summarize.main([f"two={first},{second}", f"old={older}"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["segmentation minus CRF pseudo-labels"][0] == "0.0 ± 4.2 (2; -3.0-3.0)"
    dropped = rows["classes dropped by step 2 (pseudo-labels >= 0.2, segmenter < 0.1), per run"]
    # disc dropped in the first run only; cross is under 0.2 in its pseudo-labels, so it does not count
    assert dropped[0] == "disc; none" and dropped[1].rstrip(" |") == "-"
