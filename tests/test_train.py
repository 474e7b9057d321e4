"""examples/train.py end to end on a tiny synthetic run: every stage, reload, resume, Hub upload, two processes."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

import weaktr_hf.hub
from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation
from weaktr_hf.data import BadSampleError, get_class_names, get_metadata
from weaktr_hf.visualization import load_label_png
from conftest import load_example, recipe_api

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL = 12, 4
TINY = [
    "--synthetic_num_train", str(NUM_TRAIN), "--synthetic_num_val", str(NUM_VAL), "--synthetic_image_size", "32",
    "--cam_image_size", "32", "--seg_image_size", "32", "--seg_crop_size", "32", "--seg_base_size", "32",
    "--window_size", "32", "--window_stride", "24", "--hidden_size", "32", "--intermediate_size", "64",
    "--num_hidden_layers", "2", "--num_attention_heads", "2", "--decoder_hidden_size", "32",
    "--decoder_intermediate_size", "64", "--decoder_num_attention_heads", "2", "--decoder_num_hidden_layers", "1",
    "--per_device_train_batch_size", "4", "--seg_per_device_train_batch_size", "4", "--num_train_epochs", "2",
    "--seg_num_train_epochs", "1", "--cam_eval_samples", "4", "--eval_scales", "1.0", "1.5", "--num_visualizations",
    "2", "--clip_window_size", "16", "--cam_sweep_thresholds", "0.3", "0.5", "--backbone", "none",
]  # fmt: skip


def load_script():
    return recipe_api()


@pytest.fixture(scope="module")
def script():
    return load_script()


def copy_run_outputs(output_dir, destination, names=("cam", "pseudo_labels", "seg")):
    """A new run folder holding only these outputs of a finished run (a stage or a script rerun from them)."""
    for name in names:
        shutil.copytree(output_dir / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def finished_run(script, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    results = script.main(["--output_dir", str(output_dir), *TINY])
    return output_dir, results


def test_whole_recipe_writes_models_results_and_figures(finished_run):
    output_dir, results = finished_run
    saved = json.loads((output_dir / "all_results.json").read_text())
    for key in ("coarse_cam_miou", "fine_cam_miou", "pseudo_label_miou", "pseudo_label_crf_miou", "seg_val_miou",
                "seg_val_miou_ms_flip", "trivial_baseline_miou"):  # fmt: skip
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved == json.loads(json.dumps(results))
    assert len(list((output_dir / "pseudo_labels").glob("*.png"))) == NUM_TRAIN
    assert len(list((output_dir / "pseudo_labels_nocrf").glob("*.png"))) == NUM_TRAIN
    figures = sorted(path.name for path in (output_dir / "figures").glob("*.png"))
    assert any(name.startswith("cam_") for name in figures) and any(name.startswith("prediction_") for name in figures)
    assert "summary.png" in figures
    for name in figures:  # readable panels: at least 256 px even though the images are 32 px
        with PIL.Image.open(output_dir / "figures" / name) as figure:
            assert figure.height >= 256, name
    assert json.loads((output_dir / "cam_selection.json").read_text())["threshold"] in (0.3, 0.5)
    # The eval stage also scores the segmenter against its own training pseudo-labels, per class.
    fit = saved["seg_train_fit_per_class_iou"]
    assert list(saved["pseudo_label_crf_per_class_iou"]) == list(fit) == list(saved["pseudo_label_per_class_iou"])
    assert list(fit) == list(saved["seg_val_per_class_iou"]) and all(0.0 <= iou <= 1.0 for iou in fit.values())
    assert saved["seg_train_fit_samples"] == NUM_TRAIN and 0.0 <= saved["seg_train_fit_miou"] <= 1.0


def test_saved_models_reload_and_run_in_the_pipelines(finished_run):
    output_dir, _ = finished_run
    assert isinstance(WeakTrForCAM.from_pretrained(output_dir / "cam"), WeakTrForCAM)
    model = WeakTrForSemanticSegmentation.from_pretrained(output_dir / "seg")
    assert model.config.id2label[0] == "background" and model.config.num_labels == 5
    segmenter = pipeline("image-segmentation", model=str(output_dir / "seg"))
    from weaktr_hf.data import load_wsss_dataset

    image = load_wsss_dataset("synthetic", split="val", num_val=1, image_size=40)[0]["image"]
    segments = segmenter(image)
    assert segments and all(segment["mask"].size == image.size for segment in segments)
    classifier = pipeline("image-classification", model=str(output_dir / "cam"))
    assert len(classifier(image, top_k=4)) == 4


def test_saved_processors_carry_the_models_patch_size(finished_run):
    output_dir, _ = finished_run
    for stage in ("cam", "seg"):
        patch_size = json.loads((output_dir / stage / "config.json").read_text())["patch_size"]
        saved = json.loads((output_dir / stage / "preprocessor_config.json").read_text())
        assert saved["size_divisor"] == patch_size == 8, stage


def test_pseudo_stage_skips_finished_images_and_rewrites_nothing(script, finished_run):
    output_dir, _ = finished_run
    pngs = sorted((output_dir / "pseudo_labels").glob("*.png"))
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in pngs}
    removed = pngs[0]
    removed_bytes = removed.read_bytes()
    removed.unlink()
    results = script.main(["--output_dir", str(output_dir), "--stage", "pseudo", "--pseudo_label_eval_split", "train",
                           *TINY])  # fmt: skip
    assert results["pseudo_labels_written_per_process"] == [1]  # only the deleted image is redone
    # Also scored on the images of another split (VOC: train, within train_aug); here the same split, same numbers.
    assert results["pseudo_label_crf_miou_train"] == results["pseudo_label_crf_miou"]
    assert results["pseudo_label_miou_train"] == results["pseudo_label_miou"]
    assert removed.read_bytes() == removed_bytes
    for path in pngs[1:]:
        assert (path.stat().st_mtime_ns, path.read_bytes()) == before[path.name]


def test_stage_seg_alone_trains_the_segmenter_of_the_whole_run(script, finished_run, tmp_path):
    """Each stage starts from the seed: step 2 rerun on its own (from the run's step-1 model and pseudo-labels) gives
    the whole run's segmenter bit for bit, decoder initialisation included."""
    output_dir, _ = finished_run
    rerun = copy_run_outputs(output_dir, tmp_path / "rerun", ("cam", "pseudo_labels", "pseudo_labels_nocrf"))
    script.main(["--output_dir", str(rerun), "--stage", "seg", *TINY])
    whole = WeakTrForSemanticSegmentation.from_pretrained(output_dir / "seg").state_dict()
    alone = WeakTrForSemanticSegmentation.from_pretrained(rerun / "seg").state_dict()
    assert whole.keys() == alone.keys()
    assert all(torch.equal(whole[key], alone[key]) for key in whole)


def test_eval_warns_when_the_segmenter_never_predicts_a_class_its_pseudo_labels_hold(script, finished_run, tmp_path,
                                                                                    capsys, caplog):
    output_dir, _ = finished_run
    rerun = copy_run_outputs(output_dir, tmp_path / "rerun")
    model = WeakTrForSemanticSegmentation.from_pretrained(rerun / "seg")
    with torch.no_grad():  # the class LayerNorm gives only its bias: background everywhere
        model.decoder.mask_norm.weight.zero_()
        model.decoder.mask_norm.bias.copy_(torch.tensor([5.0] + [0.0] * (model.config.num_labels - 1)))
    model.save_pretrained(rerun / "seg")
    capsys.readouterr()

    with caplog.at_level(logging.WARNING, logger="weaktr_hf.diagnostics"):
        results = script.main(["--output_dir", str(rerun), "--stage", "eval", *TINY])

    labels = np.concatenate([np.asarray(PIL.Image.open(path)).ravel() for path in (rerun / "pseudo_labels").glob("*.png")])
    held = [name for index, name in enumerate(results["seg_train_fit_per_class_iou"]) if index and (labels == index).any()]
    assert held and results["seg_never_predicted_classes"] == held
    assert all(results["seg_train_fit_per_class_iou"][name] == 0.0 for name in held)
    out = capsys.readouterr().out
    assert out.count("WARNING: class") == len(held) and "never predicts " + ", ".join(held) in out
    # each class's warning once in the stage's output: printed, not also logged by the diagnostics module
    assert not [record for record in caplog.records if record.name == "weaktr_hf.diagnostics"]


def test_diagnose_step2_reports_what_the_patch_grid_leaves_of_the_labels(finished_run, tmp_path):
    """examples/diagnose_step2.py on a finished run: the pseudo-labels (train) and the truth (val) through the
    segmenter's patch grid, one pass and the run's evaluation scales, in its JSON and Markdown reports; and the
    segmenter's val mIoU with each image told its own classes."""
    from weaktr_hf.data import load_wsss_dataset
    from weaktr_hf.data.schema import mask_to_array
    from weaktr_hf.diagnostics import patch_grid_miou

    output_dir, _ = finished_run
    rerun = copy_run_outputs(output_dir, tmp_path / "rerun")
    diagnostics = load_example("diagnose_step2.py", "diagnose_step2").main(["--diagnose_only", "--output_dir",
                                                                            str(rerun), *TINY])  # fmt: skip
    found = diagnostics["patch_grid"]

    assert list(found) == [f"{labels}, {passes}" for labels in ("pseudo-labels (train)", "truth (val)")
                           for passes in ("single scale", "multi-scale")]  # fmt: skip
    assert all(0.0 < value <= 1.0 for value in found.values())
    val = load_wsss_dataset("synthetic", split="val", num_classes=4, image_size=32, num_train=NUM_TRAIN,
                            num_val=NUM_VAL, seed=42)  # fmt: skip
    truths = [mask_to_array(mask) for mask in val["semantic_mask"]]
    patch_size = WeakTrForSemanticSegmentation.from_pretrained(rerun / "seg").config.patch_size
    expected = patch_grid_miou(zip(truths, truths), 5, patch_size, scales=(1.0, 1.5))["mean_iou"]
    assert found["truth (val), multi-scale"] == pytest.approx(expected)
    report = (rerun / "step2_diagnostics.md").read_text()
    assert "through the segmenter's patch grid" in report
    assert f"truth (val), multi-scale: {100 * expected:.1f}" in report
    told = diagnostics["seg_val_per_class_iou_image_labels"]
    assert list(told) == diagnostics["classes"] and all(0.0 <= value <= 1.0 for value in told.values())
    line = (f"restricted to the classes of its mask (the image-level labels the pseudo-labels are made with): "
            f"{100 * diagnostics['seg_val_miou_ms_flip_image_labels']:.1f}")  # fmt: skip
    assert line in report


def test_diagnose_step2_scores_the_segmenter_as_the_eval_stage_did(script, finished_run, tmp_path, monkeypatch):
    """diagnose_step2 takes the eval stage's geometry from the run's flags (here a base size and the auxiliary
    decoder's weight, which the demo leaves off): its fit report equals the eval stage's on the same segmenter, and
    its told pass gets the same window, sizes and aux weight."""
    output_dir, _ = finished_run
    rerun = copy_run_outputs(output_dir, tmp_path / "rerun")
    flags = [*TINY, "--eval_base_size", "40", "--eval_aux_weight", "0.5", "--fit_report_samples", "6"]
    results = script.main(["--stage", "eval", "--output_dir", str(rerun), *flags])
    module = load_example("diagnose_step2.py", "diagnose_step2")
    module_evaluate, calls = module.evaluate_segmentation, []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return module_evaluate(*args, **kwargs)

    monkeypatch.setattr(module, "evaluate_segmentation", recording)
    diagnostics = module.main(["--diagnose_only", "--output_dir", str(rerun), *flags])

    assert diagnostics["fit_report"]["fit_samples"] == results["seg_train_fit_samples"] == 6
    assert diagnostics["fit_report"]["fit_miou"] == pytest.approx(results["seg_train_fit_miou"])
    (told,) = calls
    assert told["present_classes_only"] and told["skip_unlabelled"]
    assert (told["base_size"], told["aux_weight"], told["window_size"], told["window_stride"]) == (40, 0.5, 32, 24)


def test_push_to_hub_uploads_model_processor_and_card(script, finished_run, monkeypatch):
    output_dir, _ = finished_run
    uploads, created = [], []

    class RecordingHfApi:
        def __init__(self, token=None):
            pass

        def whoami(self, token=None):
            return {"name": "someone"}

        def create_repo(self, repo_id, exist_ok=False, **kwargs):
            assert exist_ok
            created.append(repo_id)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, {name: Path(folder_path, name) for name in os.listdir(folder_path)}))

    monkeypatch.setattr(weaktr_hf.hub, "HfApi", RecordingHfApi)
    script.main(["--output_dir", str(output_dir), "--stage", "eval", "--push_to_hub", "--hub_model_id",
                 "someone/weaktr-demo", *TINY])  # fmt: skip
    # Both repositories exist before anything runs; the segmenter and the CAM model each go to their own.
    assert created[:2] == ["someone/weaktr-demo", "someone/weaktr-demo-cam"]
    (repo_id, files), (cam_repo_id, cam_files) = uploads
    assert (repo_id, cam_repo_id) == ("someone/weaktr-demo", "someone/weaktr-demo-cam")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert {"config.json", "model.safetensors", "README.md"} <= set(cam_files)
    assert "pipeline_tag: image-classification" in cam_files["README.md"].read_text()
    from huggingface_hub import ModelCard

    card = ModelCard(files["README.md"].read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert "arxiv:2304.01184" in card.data.tags and card.data.license is None  # no --license: none is assumed
    assert card.data.datasets is None  # "synthetic" is not a Hub dataset id
    index = card.data.eval_results[0]
    assert index.metric_type == "mean_iou" and 0 <= index.metric_value <= 100
    assert "--push_to_hub" in card.text


def test_push_to_hub_without_a_login_stops_before_training(tmp_path):
    """Offline or without a token, `--push_to_hub` stops at once with one line on stderr; nothing is trained."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_TOKEN", None)
    command = [sys.executable, str(ROOT / "examples" / "train.py"), "--output_dir", str(tmp_path / "run"),
               "--push_to_hub", "--hub_model_id", "someone/x", *TINY]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --push_to_hub: cannot push to the Hub: offline mode is on"), lines
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "cam").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_summary_figure_has_one_bar_per_measured_stage(script, tmp_path):
    results = {"trivial_baseline_miou": 0.45, "coarse_cam_miou": 0.5, "fine_cam_miou": 0.2, "pseudo_label_miou": 0.55,
               "pseudo_label_crf_miou": 0.6, "pseudo_label_miou_train": None, "seg_val_miou_ms_flip": 0.5}  # fmt: skip
    script.save_summary_figure(results, tmp_path / "summary.png")
    row = np.asarray(PIL.Image.open(tmp_path / "summary.png").convert("RGB"))[-70]  # just above the axis
    is_bar = (row == (70, 130, 180)).all(-1) | (row == (214, 96, 77)).all(-1)
    starts = np.flatnonzero(is_bar[1:] & ~is_bar[:-1])
    assert len(starts) == 5  # every stage with a value (the same label twice included), none for the missing one


def test_synthetic_config_selects_the_variant_of_the_synthetic_set(script):
    args = script.parse_args(["--synthetic_config", "eight-classes", "--synthetic_num_train", "2",
                              "--synthetic_num_val", "1", "--synthetic_image_size", "32"])  # fmt: skip
    dataset = script.load_data(args)

    assert len(get_class_names(dataset)) == 8
    assert get_metadata(dataset["train"])["synthetic"]["num_classes"] == 8


def test_crop_smaller_than_the_clipping_window_is_a_clear_error(script, capsys):
    with pytest.raises(script.RecipeError, match="--seg_crop_size 24 is smaller than --clip_window_size 32"):
        script.parse_args(["--seg_crop_size", "24", "--clip_window_size", "32"])
    script.parse_args(["--seg_crop_size", "24", "--clip_window_size", "32", "--no_gradient_clipping"])


def test_demo_preset_starts_from_the_committed_backbone_and_paper_presets_keep_the_fine_cam(script):
    demo = script.parse_args([])
    assert demo.backbone == script.DEMO_BACKBONE and os.path.isfile(demo.backbone)
    assert script.model_config(demo, {0: "a"}, 64).fine_cam_scale == 64.0  # the demo's option
    assert script.parse_args(["--backbone", "none"]).backbone is None  # the demo from random weights
    for preset in ("voc12-deit-s", "coco14-deit-s"):
        args = script.parse_args(["--preset", preset, "--dataset_path", "data", "--backbone", "deit_small_patch16_224"])
        assert script.model_config(args, {0: "a"}, 224).fine_cam_scale == 1.0  # the paper's model


def test_bad_preset_use_is_a_clear_error(script, capsys):
    with pytest.raises(script.RecipeError, match="needs --dataset_path"):
        script.parse_args(["--preset", "voc12-deit-s"])
    with pytest.raises(script.RecipeError, match="needs --dataset_path"):  # --print_config checks as a run does
        script.parse_args(["--preset", "voc12-deit-s", "--print_config"])


def logged_scalars(output_dir, tag):
    """(step, value) of every `tag` event tensorboard wrote under `output_dir`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for event_file in Path(output_dir).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            events += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(events)


# Global batches (4 images per update whatever the number of processes) and the authors' per-epoch step-1 schedule.
PER_DEVICE_FLAGS = {"--per_device_train_batch_size", "--seg_per_device_train_batch_size"}
TINY_GLOBAL = [flag for i, flag in enumerate(TINY) if PER_DEVICE_FLAGS.isdisjoint((flag, TINY[i - 1]))]
TINY_GLOBAL += ["--total_train_batch_size", "4", "--seg_total_train_batch_size", "4", "--cam_lr_schedule", "epoch",
                "--warmup_epochs", "1", "--warmup_learning_rate", "1e-5", "--min_learning_rate", "1e-4",
                "--seg_min_learning_rate", "1e-3", "--with_tracking", "--logging_steps", "1", "--num_visualizations",
                "0"]  # fmt: skip


def test_two_processes_make_the_updates_of_one_and_shard_pseudo_labels(script, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (on a CPU-only machine: two gloo processes) makes the same
    number of optimizer updates, at the same lr per update, as one process with the same global batch; the
    pseudo-label stage writes each image exactly once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    two = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "examples" / "train.py"), "--output_dir", str(two), *TINY_GLOBAL]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((two / "all_results.json").read_text())
    assert results["pseudo_labels_written_per_process"] == [NUM_TRAIN // 2, NUM_TRAIN // 2]
    assert len(list((two / "pseudo_labels").glob("*.png"))) == NUM_TRAIN

    one = tmp_path / "one"
    script.main(["--output_dir", str(one), *TINY_GLOBAL])
    single = json.loads((one / "all_results.json").read_text())
    # 12 images in global batches of 4: 3 updates per epoch, 2 step-1 epochs and 1 step-2 epoch.
    assert single["cam_train_steps"] == results["cam_train_steps"] == 6
    assert single["seg_train_steps"] == results["seg_train_steps"] == 3
    for tag in ("cam/lr", "seg/lr"):
        lrs_one, lrs_two = logged_scalars(one, tag), logged_scalars(two, tag)
        assert [step for step, _ in lrs_one] == list(range(1, 1 + single[f"{tag[:-3]}_train_steps"]))
        assert [step for step, _ in lrs_two] == [step for step, _ in lrs_one]
        assert [lr for _, lr in lrs_two] == pytest.approx([lr for _, lr in lrs_one])  # approx takes flat lists
        assert len({lr for _, lr in lrs_one}) > 1  # the schedule moves, so equal lists mean something


def test_tracking_logs_the_three_cam_losses_lr_and_selection_miou(script, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script.main(["--output_dir", str(tmp_path), "--stage", "cam", "--with_tracking", "--report_to", "tensorboard",
                 "--logging_steps", "1", *TINY])  # fmt: skip
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"cam/loss", "cam/class_loss", "cam/coarse_loss", "cam/fine_loss", "cam/lr", "cam/selection_miou"} <= tags


@pytest.fixture(scope="module")
def mask_free_run(script, tmp_path_factory):
    """The whole recipe on a one-class synthetic set with every mask removed (train and val) and every fourth image
    replaced by background only (an empty label list), saved like a user's dataset."""
    import numpy as np

    from weaktr_hf.data import load_wsss_dataset

    root = tmp_path_factory.mktemp("mask_free")
    dataset = load_wsss_dataset(
        "synthetic", num_classes=1, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=32, seed=42
    )

    def background_only(example, index):
        if index % 4 != 3:
            return {}
        noise = np.random.default_rng(index).integers(90, 160, (32, 32, 3), dtype=np.uint8)
        return {"image": PIL.Image.fromarray(noise), "labels": []}

    dataset = dataset.remove_columns("semantic_mask").map(background_only, with_indices=True)
    dataset.save_to_disk(str(root / "data"))
    output_dir = root / "run"
    results = script.main(["--output_dir", str(output_dir), *TINY, "--dataset_path", str(root / "data")])
    return output_dir, results


def test_whole_recipe_runs_without_masks_and_records_its_rules(mask_free_run):
    output_dir, results = mask_free_run
    saved = json.loads((output_dir / "all_results.json").read_text())
    assert saved["cam_selection_rule"] == "heldout_classification_loss" and saved["cam_selection_heldout_loss"] > 0
    assert saved["pseudo_label_choice_rule"] == saved["cam_choice_rule"] == "otsu_threshold_pass_agreement"
    selection = json.loads((output_dir / "cam_selection.json").read_text())
    assert selection["cam"] == saved["pseudo_label_cam"] in ("coarse_cam", "fine_cam", "cross_attention")
    assert selection["threshold"] == saved["pseudo_label_threshold"] and 0 < selection["threshold"] < 1
    assert selection["epoch"] == saved["cam_best_epoch"] in (0, 1)
    # Nothing was scored, and the eval stage says why.
    assert "pseudo_label_miou" not in saved and "fine_cam_miou" not in saved and saved["seg_val_miou"] is None
    assert "mIoU needs ground-truth masks" in saved["seg_val_note"]
    assert WeakTrForCAM.from_pretrained(output_dir / "cam").config.num_labels == 1  # one foreground class
    assert WeakTrForSemanticSegmentation.from_pretrained(output_dir / "seg").config.num_labels == 2
    assert len(list((output_dir / "pseudo_labels").glob("*.png"))) == NUM_TRAIN
    assert not load_label_png(output_dir / "pseudo_labels" / "synthetic_train_000003.png").any()  # background only
    predictions = sorted((output_dir / "predictions").glob("*.png"))
    assert len(predictions) == NUM_VAL == saved["seg_val_predicted_samples"]
    figures = sorted(path.name for path in (output_dir / "figures").glob("*.png"))
    assert sum(name.startswith("prediction_") for name in figures) == 2 and any(n.startswith("cam_") for n in figures)


def test_user_data_flags_name_columns_read_class_names_and_hold_out_a_split(script, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    rows = [("a.png", "fox"), ("b.png", "owl;fox"), ("c.png", "[]"), ("d.png", "owl")]
    for i, (name, _) in enumerate(rows):
        PIL.Image.new("RGB", (20, 16), (40 * i, 90, 10)).save(root / name)
    (root / "metadata.csv").write_text("file_name,tags\n" + "".join(f"{n},{t}\n" for n, t in rows))
    (tmp_path / "classes.txt").write_text("owl\nfox\n")

    args = script.parse_args(["--dataset_path", str(root), "--labels_column_name", "tags", "--class_names",
                              str(tmp_path / "classes.txt"), "--validation_split_percentage", "25"])  # fmt: skip
    dataset = script.load_data(args)

    assert get_class_names(dataset) == ["owl", "fox"] and (args.train_split, args.val_split) == ("train", "val")
    assert (len(dataset["train"]), len(dataset["val"])) == (3, 1)
    ids = list(dataset["train"]["id"]) + list(dataset["val"]["id"])
    labels = list(dataset["train"]["labels"]) + list(dataset["val"]["labels"])
    labels = dict(zip(ids, labels))
    assert labels == {"00000000_a": [1], "00000001_b": [0, 1], "00000002_c": [], "00000003_d": [0]}
    args = script.parse_args(["--dataset_path", str(root), "--labels_column_name", "tags", "--class_names", "owl"])
    with pytest.raises(BadSampleError, match=r"a\.png\) has label 'fox', which is not one of the class names"):
        script.load_data(args)


# ---------------------------------------------------------------------------------------------------------------------
# Step 2 on the authors' other backbones
# ---------------------------------------------------------------------------------------------------------------------

# What each backbone preset changes in its DeiT-S twin: the step-2 encoder and its weights and statistics only.
STEP2_CHANGES = {
    "vit-s": dict(seg_encoder="vit", seg_backbone="vit_small_patch16_384.augreg_in21k_ft_in1k",
                  seg_backbone_interpolation="bicubic", seg_image_mean=[0.5] * 3, seg_image_std=[0.5] * 3),
    "dinov2-s": dict(seg_encoder="dinov2", seg_backbone="vit_small_patch14_dinov2.lvd142m",
                     seg_backbone_interpolation="bilinear"),
    "eva02-s": dict(seg_encoder="eva02", seg_intermediate_size=1024, seg_backbone="eva02_small_patch14_224.mim_in22k",
                    seg_backbone_interpolation="bilinear", seg_image_mean=[122.77 / 255, 116.75 / 255, 104.09 / 255],
                    seg_image_std=[68.5 / 255, 66.63 / 255, 70.32 / 255]),
}  # fmt: skip


@pytest.mark.parametrize("dataset", ["voc12", "coco14"])
@pytest.mark.parametrize("backbone", sorted(STEP2_CHANGES))
def test_backbone_presets_are_the_deit_recipe_with_their_step2_encoder(script, dataset, backbone):
    common = ["--dataset_path", "data", "--backbone", "deit_small_patch16_224"]
    deit = vars(script.parse_args(["--preset", f"{dataset}-deit-s", *common]))
    resolved = vars(script.parse_args(["--preset", f"{dataset}-{backbone}", *common]))
    changed = {key for key in resolved if resolved[key] != deit[key] and key not in ("preset", "command")}
    assert changed <= set(STEP2_CHANGES[backbone])  # nothing else of the recipe differs
    for key, value in STEP2_CHANGES[backbone].items():
        assert list(resolved[key]) == value if isinstance(value, list) else resolved[key] == value, key
    assert resolved["backbone"] == "deit_small_patch16_224" and resolved["seg_init"] == "backbone"


def test_step2_trains_on_a_local_eva02_backbone_file(script, finished_run, tmp_path):
    """`--seg_backbone FILE --seg_encoder eva02`: the official-layout EVA-02 weights (14-px patches scaled down to
    7 px here, for the 8-px demo patches) load with the kernel resize, train, and the saved model is an EVA-02
    segmenter with CLIP statistics in its processor."""
    import shutil

    import timm
    import torch

    run = tmp_path / "run"
    shutil.copytree(finished_run[0] / "pseudo_labels", run / "pseudo_labels")
    eva = timm.create_model("eva02_small_patch14_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32,
                            depth=2, num_heads=2, mlp_ratio=2.0)  # fmt: skip
    state = {key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.").replace("fc_norm.", "norm."): value
             for key, value in eva.state_dict().items()}  # fmt: skip
    torch.save({"module": state}, tmp_path / "eva02.pt")
    clip_mean, clip_std = ["0.48145466", "0.4578275", "0.40821073"], ["0.26862954", "0.26130258", "0.27577711"]
    script.main(["--output_dir", str(run), *TINY, "--stage", "seg", "--seg_init", "backbone", "--seg_encoder", "eva02",
                 "--seg_intermediate_size", "64", "--seg_backbone", str(tmp_path / "eva02.pt"),
                 "--seg_image_mean", *clip_mean, "--seg_image_std", *clip_std])  # fmt: skip
    model = WeakTrForSemanticSegmentation.from_pretrained(run / "seg")
    assert model.config.encoder_variant == "eva02" and model.config.intermediate_size == 64
    assert model.config.layer_norm_eps == 1e-5
    # Started from the file's weights (one short epoch at the demo's encoder lr moves them by ~1e-4 at most).
    trained, source = model.weaktr.blocks[0].attn.qkv.weight, eva.blocks[0].attn.qkv.weight
    assert 0 < (trained - source).abs().max() < 1e-2
    from weaktr_hf import WeakTrImageProcessor

    assert list(WeakTrImageProcessor.from_pretrained(run / "seg").image_mean) == [float(v) for v in clip_mean]


def test_step2_encoder_other_than_vit_cannot_start_from_the_cam_encoder(script, capsys):
    with pytest.raises(script.RecipeError, match="--seg_init cam starts step 2 from the step-1 encoder"):
        script.parse_args(["--seg_encoder", "dinov2", "--seg_init", "cam"])


def test_a_local_dinov3_style_timm_folder_is_the_backbone_of_both_steps(script, tmp_path):
    """`--backbone DIR --seg_backbone DIR` with a folder saved by timm (config.json + model.safetensors): the encoder's
    config (4 registers, DINOv3 rotary embedding, no position table) is read from timm for both steps, and all four
    stages run."""
    import timm

    dinov3 = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                               depth=2, num_heads=2)  # fmt: skip
    timm.models.save_for_hf(dinov3, str(tmp_path / "dinov3"), safe_serialization=True)
    run = tmp_path / "run"
    results = script.main(["--output_dir", str(run), *TINY, "--backbone", str(tmp_path / "dinov3"), "--seg_backbone",
                           str(tmp_path / "dinov3"), "--seg_init", "backbone"])  # fmt: skip
    assert results["seg_val_miou"] is not None and results["pseudo_labels_written_per_process"] == [NUM_TRAIN]
    for name, model_class in (("cam", WeakTrForCAM), ("seg", WeakTrForSemanticSegmentation)):
        config = model_class.from_pretrained(run / name).config
        assert config.num_register_tokens == 4 and config.rope_type == "dinov3", name
        assert not config.use_absolute_position_embeddings and config.patch_size == 8, name
