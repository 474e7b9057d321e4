"""The weaktr-train command line: help and preset values, one boolean style with the old spellings, aliases, exit
codes, the CRF-less install path and the own-photos preset."""

import json
import subprocess
import sys

import PIL.Image
import pytest

import weaktr_hf.crf
from weaktr_hf.data import SYNTHETIC_CONFIGURATIONS
from weaktr_hf.recipes import PRESETS, RecipeError
from weaktr_hf.train import SYNTHETIC_CONFIGURATION_NAMES, build_parser, main, parse_args
from test_train import TINY


def test_every_flag_has_help_and_shows_the_presets_value():
    parser = build_parser("voc12-deit-s")
    actions = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert len(actions) > 100
    assert all(action.help for action in actions), [a.dest for a in actions if not a.help]
    text = parser.format_help()
    assert "[voc12-deit-s: 0.43]" in text  # --cam_threshold
    assert "[voc12-deit-s: 520]" in text  # --seg_base_size


def test_booleans_take_both_styles():
    assert parse_args(["--seg_nesterov"]).seg_nesterov is True
    assert parse_args(["--no_seg_nesterov"]).seg_nesterov is False
    assert parse_args(["--no-seg_nesterov"]).seg_nesterov is False
    assert parse_args(["--seg_nesterov", "false"]).seg_nesterov is False  # the older spelling
    assert parse_args(["--seg_nesterov", "true"]).seg_nesterov is True
    assert parse_args([]).seg_nesterov is False  # the demo preset's value
    assert parse_args(["--no_cam_flip"]).cam_flip is False and parse_args([]).cam_flip is True
    assert parse_args(["--no_gradient_clipping"]).use_gradient_clipping is False
    assert parse_args(["--no_crf"]).no_crf is True
    with pytest.raises(SystemExit):
        parse_args(["--seg_nesterov", "maybe"])


def test_hf_names_are_accepted():
    args = parse_args(["--preset", "voc12-deit-s", "--dataset_name", "/data/voc", "--model_name_or_path",
                       "deit_small_patch16_224"])  # fmt: skip
    assert args.dataset_path == "/data/voc" and args.backbone == "deit_small_patch16_224"


def test_synthetic_configuration_names_are_the_data_modules():
    assert set(SYNTHETIC_CONFIGURATION_NAMES) == set(SYNTHETIC_CONFIGURATIONS)


def test_console_script_exits_zero_on_success_and_two_with_one_line_on_a_user_error():
    ok = subprocess.run([sys.executable, "-m", "weaktr_hf.train", "--print_config"], capture_output=True, text=True,
                        timeout=300)  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)["preset"] == "demo"
    bad = subprocess.run([sys.executable, "-m", "weaktr_hf.train", "--preset", "voc12-deit-s", "--print_config"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("weaktr-train: error: --preset voc12-deit-s needs --dataset_path (a VOCdevkit/"
                                  "VOC2012 or COCO root, a folder of your images, a saved dataset or a Hub id).")


def test_without_pydensecrf_the_run_says_so_before_training_and_skips_the_crf(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weaktr_hf.crf, "crf_available", lambda: False)
    results = main(["--output_dir", str(tmp_path), *TINY, "--eval_crf", "voc12"])
    out = capsys.readouterr().out
    note = "pydensecrf2 is not installed, so the pseudo-labels and the evaluation will be made without the dense CRF"
    assert note in out and out.index(note) < out.index("== stage cam ==")
    assert 'pip install "weaktr-hf[crf]"' in results["crf_note"]
    assert "pseudo_label_crf_miou" not in results and "seg_val_miou_ms_flip_crf" not in results
    assert not (tmp_path / "pseudo_labels_nocrf").exists()


def photo_folder(root):
    """A folder of drawn photos with metadata.csv (image-level labels by name), no masks."""
    root.mkdir()
    rows = []
    for index in range(16):
        image = PIL.Image.new("RGB", (32, 32), (200, 200, 200))
        name = ("cat", "dog")[index % 2]
        image.paste((220, 40, 40) if name == "cat" else (40, 40, 220), (4 + index % 8, 6, 20 + index % 8, 24))
        image.save(root / f"photo_{index}.png")
        rows.append(f"photo_{index}.png,{name}\n")
    (root / "metadata.csv").write_text("file_name,labels\n" + "".join(rows))
    return root


def saved_dataset_with_some_masks(root):
    """The synthetic set saved like a user's dataset, with the masks of every other training image removed."""
    from weaktr_hf.data import load_wsss_dataset

    dataset = load_wsss_dataset("synthetic", num_classes=2, num_train=12, num_val=4, image_size=32, seed=0)
    dataset["train"] = dataset["train"].map(lambda example, index: {} if index % 2 == 0 else {"semantic_mask": None},
                                            with_indices=True)  # fmt: skip
    dataset.save_to_disk(str(root))
    return root


def own_tiny(preset):
    """TINY sizes for a paper-family preset (its 224/480 px and DeiT-S sizes replaced), from random weights."""
    sizes = [*TINY, "--patch_size", "8", "--aaf_reduction", "2", "--aaf_feat_reduction", "2", "--eval_base_size", "32",
             "--eval_min_size", "32", "--cam_augment", "light", "--total_train_batch_size", "4",
             "--seg_total_train_batch_size", "4", "--cam_eval_samples", "8", "--allow_random_init"]  # fmt: skip
    return ["--preset", preset, *sizes]


def test_own_preset_without_masks_uses_the_mask_free_choice_and_records_it(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    results = main(["--output_dir", str(tmp_path / "run"), "--dataset_path", str(folder), *own_tiny("own-deit-s"),
                    "--target_train_updates", "6", "--seg_target_train_updates", "3", "--max_train_epochs", "3",
                    "--seg_max_train_epochs", "2"])  # fmt: skip
    assert results["pseudo_label_choice_rule"] == results["cam_choice_rule"] == "otsu_threshold_pass_agreement"
    assert results["pseudo_label_cam"] == results["cam_choice"]
    assert results["pseudo_label_threshold"] == results["cam_choice_threshold"]
    assert "preset_values_kept" not in results
    assert results["seg_val_prediction_passes"].startswith("scale 1.0, no flip")


def test_own_preset_with_some_masks_chooses_from_those_masks(tmp_path):
    folder = saved_dataset_with_some_masks(tmp_path / "data")
    results = main(["--output_dir", str(tmp_path / "run"), "--dataset_path", str(folder), *own_tiny("own-deit-s"),
                    "--stage", "cam"])  # fmt: skip
    assert results["cam_selection_rule"] == "train_subset_cam_miou"
    assert results["cam_selection_miou"] > 0
    selection = json.loads((tmp_path / "run" / "cam_selection.json").read_text())
    assert selection["rule"] == "train_subset_cam_miou" and set(selection["per_cam"]) == {
        "coarse_cam", "fine_cam", "cross_attention"}  # fmt: skip


def test_voc_preset_on_another_dataset_names_the_values_it_keeps(tmp_path, capsys):
    folder = photo_folder(tmp_path / "photos")
    args = parse_args(["--preset", "voc12-deit-s", "--dataset_path", str(folder), "--allow_random_init"])
    from weaktr_hf.stages import tuned_values_kept

    kept = tuned_values_kept(args)
    assert kept["cam_threshold"] == 0.43 and kept["pseudo_label_cam"] == "fine_cam" and kept["crf"] == "voc12"
    assert tuned_values_kept(parse_args(["--preset", "own-deit-s", "--dataset_path", str(folder),
                                         "--allow_random_init"])) == {}  # fmt: skip


def test_own_preset_print_config_states_its_rules(capsys):
    main(["--preset", "own-deit-s", "--dataset_path", "photos", "--backbone", "deit_small_patch16_224",
          "--print_config"])  # fmt: skip
    config = json.loads(capsys.readouterr().out)
    assert config["cam_threshold"] == "sweep" and config["pseudo_label_cam"] == "auto"
    assert set(config["rules"]) == {"pseudo_label_choice", "training_length", "evaluation_without_masks"}
    assert "9900 updates" in config["rules"]["training_length"]
    # Everything that does not depend on VOC is the authors' DeiT-S recipe.
    voc = PRESETS["voc12-deit-s"]
    for key in ("learning_rate", "weight_decay", "seg_learning_rate", "clip_start_value", "total_train_batch_size",
                "seg_total_train_batch_size", "cam_image_size", "seg_crop_size", "eval_base_size"):  # fmt: skip
        assert config[key] == pytest.approx(voc[key]), key
    with pytest.raises(RecipeError, match="needs --dataset_path"):
        parse_args(["--preset", "own-deit-s", "--backbone", "deit_small_patch16_224"])


def test_encoder_names_are_the_configs_variants():
    from weaktr_hf.configuration_weaktr import ENCODER_VARIANTS
    from weaktr_hf.recipes import ENCODER_NAMES

    assert set(ENCODER_NAMES) == set(ENCODER_VARIANTS)


def test_loss_average_choices_are_the_configs():
    from weaktr_hf.configuration_weaktr import LOSS_AVERAGES as CONFIG_AVERAGES
    from weaktr_hf.recipes import LOSS_AVERAGES

    assert LOSS_AVERAGES == CONFIG_AVERAGES


def test_only_non_paper_backbones_read_their_config_from_timm(tmp_path):
    from weaktr_hf.stages import reads_timm_config

    assert not reads_timm_config("deit_small_patch16_224")  # the paper presets' step 1 keeps the recipe's encoder
    assert not reads_timm_config("eva02_small_patch14_224.mim_in22k")  # the authors' step-2 backbones too
    assert reads_timm_config("vit_base_patch16_dinov3.lvd1689m") and reads_timm_config(str(tmp_path))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert not reads_timm_config(str(tmp_path / "weights.safetensors"))
    assert reads_timm_config(str(tmp_path / "weights.safetensors"), arch="vit_small_patch16_dinov3")


def test_a_run_without_pydensecrf_resumes_with_its_own_options(tmp_path, monkeypatch):
    """The CRF is turned off before the run records its recipe, so resuming the same command is not refused as
    another recipe (no_crf recorded True, asked False)."""
    monkeypatch.setattr(weaktr_hf.crf, "crf_available", lambda: False)
    argv = ["--output_dir", str(tmp_path), *TINY, "--checkpointing_steps", "epoch"]
    main(argv)
    results = main([*argv, "--resume_from_checkpoint", "latest"])
    assert "pydensecrf2 is not installed" in results["crf_note"]
