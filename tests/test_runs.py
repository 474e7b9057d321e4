"""A run owns its output folder: reruns, overwrites, resumes and stage reruns never mix two runs' state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weaktr_hf.training
from weaktr_hf import runs
from weaktr_hf.recipes import RecipeError
from weaktr_hf.train import main, parse_args
from weaktr_hf.training import save_checkpoint
from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
# Step 1 alone, 2 epochs of 3 updates: enough to checkpoint, interrupt and resume in seconds.
CAM_ONLY = [*TINY, "--stage", "cam", "--checkpointing_steps", "1"]


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def same_weights(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("first")
    return output_dir, main(["--output_dir", str(output_dir), *TINY])


def test_a_folder_holding_another_run_is_refused_in_one_line(first_run, tmp_path):
    output_dir, _ = first_run
    before = (output_dir / "all_results.json").read_text()
    with pytest.raises(RecipeError, match="already holds a run .*--overwrite_output_dir"):
        main(["--output_dir", str(output_dir), *TINY])
    assert (output_dir / "all_results.json").read_text() == before  # nothing touched
    # From the command line: exit 2, one line on stderr, no traceback.
    done = subprocess.run([sys.executable, "-m", "weaktr_hf.train", "--output_dir", str(output_dir), *TINY],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "already holds a run" in done.stderr


def test_overwrite_gives_the_results_of_a_run_into_an_empty_folder(first_run, tmp_path):
    output_dir, first = first_run
    fresh = tmp_path / "fresh"
    (fresh / "cam").mkdir(parents=True)  # a stale model folder of an unfinished earlier run
    (fresh / "all_results.json").write_text(json.dumps({"run_id": "old", "seg_val_miou": 0.99, "old_key": 1}))
    results = main(["--output_dir", str(fresh), *TINY, "--overwrite_output_dir"])
    assert "old_key" not in results and results["run_id"] != "old"
    drop = {"run_id", "command"} | {key for key in results if key.endswith("seconds") or key == "seg_val_predictions"}
    assert {k: v for k, v in results.items() if k not in drop} == {k: v for k, v in first.items() if k not in drop}
    assert same_weights(weights(fresh / "seg"), weights(output_dir / "seg"))
    saved = json.loads((fresh / "all_results.json").read_text())
    assert saved["run_id"] == runs.read_run(fresh)["run_id"]


def test_results_hold_one_run_and_a_stage_rerun_drops_the_later_stages(first_run, tmp_path):
    output_dir, first = first_run
    rerun = tmp_path / "rerun"
    main(["--output_dir", str(rerun), *TINY])
    # Rerunning step 2 of the same run: its own results are kept until evaluation runs again.
    results = main(["--output_dir", str(rerun), *TINY, "--stage", "seg", "--seg_learning_rate", "0.05"])
    assert "seg_val_miou" not in results and "seg_val_miou" in first  # evaluation of the old segmenter dropped
    assert results["pseudo_label_miou"] == first["pseudo_label_miou"]  # earlier stages of this run kept
    record = runs.read_run(rerun)
    assert set(record["stages"]) == {"cam", "pseudo", "seg"} and record["stages"]["seg"]["finished"]


def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    main(["--output_dir", str(whole), *CAM_ONLY])
    interrupted = tmp_path / "interrupted"
    calls = []

    def save_then_stop(accelerator, checkpoint_dir, step, total_limit=None):
        path = save_checkpoint(accelerator, checkpoint_dir, step, total_limit)
        calls.append(step)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(weaktr_hf.training, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--output_dir", str(interrupted), *CAM_ONLY])
    monkeypatch.undo()
    # Resuming with other options is refused, listing what differs.
    with pytest.raises(RecipeError, match="learning_rate: 0.002 -> 0.01"):
        main(["--output_dir", str(interrupted), *CAM_ONLY, "--learning_rate", "0.01", "--resume_from_checkpoint",
              "latest"])  # fmt: skip
    main(["--output_dir", str(interrupted), *CAM_ONLY, "--learning_rate", "0.002", "--resume_from_checkpoint",
          "latest"])  # fmt: skip
    assert same_weights(weights(whole / "cam"), weights(interrupted / "cam"))


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """A higher-step checkpoint left by an earlier attempt does not push out the current run's newest one."""

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            Path(folder, "state.bin").write_text("x")

    for step in (40, 50):  # an earlier attempt's
        save_checkpoint(OneProcess(), str(tmp_path), step, total_limit=2)
    save_checkpoint(OneProcess(), str(tmp_path), 3, total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["step_3", "step_50"]
    save_checkpoint(OneProcess(), str(tmp_path), 6, total_limit=2)  # the earlier attempt's step_50 is older
    assert sorted(os.listdir(tmp_path)) == ["step_3", "step_6"]
    assert weaktr_hf.training.find_latest_checkpoint(str(tmp_path)).endswith("step_6")


def test_a_swept_threshold_is_used_only_for_its_own_cam(tmp_path):
    from weaktr_hf.stages import pseudo_label_choice

    selection = {"epoch": 1, "threshold": 0.6, "cam": "coarse_cam", "miou": 0.5,
                 "per_cam": {"coarse_cam": {"threshold": 0.6}, "fine_cam": {"threshold": 0.2}}}  # fmt: skip
    (tmp_path / "cam_selection.json").write_text(json.dumps(selection))
    args = parse_args(["--output_dir", str(tmp_path), "--pseudo_label_cam", "fine_cam"])
    assert pseudo_label_choice(args) == ("fine_cam", 0.2)
    (tmp_path / "cam_selection.json").write_text(json.dumps({k: v for k, v in selection.items() if k != "per_cam"}))
    with pytest.raises(ValueError, match="holds no threshold chosen for 'fine_cam'"):
        pseudo_label_choice(args)
    args = parse_args(["--output_dir", str(tmp_path), "--pseudo_label_cam", "coarse_cam"])
    assert pseudo_label_choice(args) == ("coarse_cam", 0.6)


def test_a_pseudo_stage_rerun_with_other_settings_makes_the_labels_again(first_run, capsys):
    """No folder flag is needed to change the threshold: rerunning the stage of the same run redoes the labels (with
    the same settings it resumes, skipping finished images, as tests/test_train.py checks)."""
    output_dir, _ = first_run
    results = main(["--output_dir", str(output_dir), *TINY, "--stage", "pseudo", "--pseudo_label_cam", "coarse_cam",
                    "--cam_threshold", "0.4"])  # fmt: skip
    assert "making the pseudo-labels again" in capsys.readouterr().out
    assert results["pseudo_label_threshold"] == 0.4 and results["pseudo_label_cam"] == "coarse_cam"
    assert results["pseudo_labels_written_per_process"] == [len(list((output_dir / "pseudo_labels").glob("*.png")))]
