"""`python -m weaktr_hf.predict` on a folder of mixed images: one class-id PNG per readable image at its size, bad files
reported and skipped, finished images not redone; the segmenter and the CAM model, on tiny random-weight models."""

import json
import sys

import numpy as np
import PIL.Image
import pytest

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrImageProcessor
from weaktr_hf.predict import (
    PredictError,
    main,
    output_names,
    run,
    save_predict_settings,
)
from weaktr_hf.visualization import load_label_png


def image_folder(root):
    """JPEG, grey PNG, RGBA PNG, a 16-bit PNG, a rotated JPEG (EXIF orientation 6), a sub-folder, one corrupt file
    and a text file; returns {relative output name: expected (width, height)}."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    PIL.Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "rgb.jpg")
    PIL.Image.fromarray(rng.integers(0, 255, (20, 26), dtype=np.uint8)).save(root / "grey.png")
    PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8), mode="RGBA").save(root / "sub" / "rgba.png")
    PIL.Image.fromarray(rng.integers(0, 65535, (18, 22), dtype=np.uint16)).save(root / "deep.png")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    PIL.Image.fromarray(rng.integers(0, 255, (16, 36, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return {"rgb": (40, 30), "grey": (26, 20), "sub/rgba": (24, 24), "deep": (22, 18), "rotated": (16, 36)}


@pytest.fixture
def saved_models(tester, tmp_path):
    segmenter = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    cam_model = WeakTrForCAM(tester.get_config()).eval()
    processor = WeakTrImageProcessor(size={"height": 32, "width": 32})
    for model, name in ((segmenter, "seg"), (cam_model, "cam")):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    return tmp_path / "seg", tmp_path / "cam"


def test_predict_writes_one_png_per_readable_image_reports_bad_ones_and_resumes(saved_models, tmp_path, capsys):
    expected = image_folder(tmp_path / "photos")
    out = tmp_path / "masks"
    command = ["--model", str(saved_models[0]), "--images", str(tmp_path / "photos"), "--output_dir", str(out),
               "--overlays", "--scales", "1.0", "1.25", "--flip", "--window_size", "16", "--window_stride", "8"]  # fmt: skip

    report = run(command)

    assert report["written"] == len(expected) and report["unreadable"] == [str(tmp_path / "photos" / "broken.png")]
    assert "1 unreadable: " in capsys.readouterr().out
    for name, size in expected.items():
        with PIL.Image.open(out / f"{name}.png") as mask:
            assert mask.mode == "P" and mask.size == size, name
        assert load_label_png(out / f"{name}.png").max() < 4  # background + 3 classes
        with PIL.Image.open(out / "overlays" / f"{name}.png") as overlay:
            assert overlay.size == size
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if "overlays" not in p.parts) == sorted(
        f"{name}.png" for name in expected
    )
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    again = run(command)

    assert again["written"] == 0 and again["done"] == len(expected)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def test_predict_with_a_cam_model_writes_masks_and_cams_from_a_glob(saved_models, tmp_path):
    image_folder(tmp_path / "photos")
    out = tmp_path / "cams"

    # A class threshold of 0 makes every class present, so each image gets one CAM picture per class; the dense CRF
    # of the pseudo-labels refines the masks.
    report = run(["--model", str(saved_models[1]), "--images", str(tmp_path / "photos" / "*.jpg"), "--output_dir",
                   str(out), "--save_cams", "--class_threshold", "0", "--cam", "coarse_cam", "--crf", "voc12"])  # fmt: skip

    assert report["written"] == 2 and not report["unreadable"]
    with PIL.Image.open(out / "rotated.png") as mask:
        assert mask.size == (16, 36)
    assert sorted(p.name for p in (out / "cams").glob("rgb_*.png")) == ["rgb_bird.png", "rgb_cat.png", "rgb_dog.png"]


def test_clashing_stems_keep_their_extension(tmp_path):
    images = [(tmp_path / "a.jpg", tmp_path.joinpath("a.jpg").relative_to(tmp_path)),
              (tmp_path / "a.png", tmp_path.joinpath("a.png").relative_to(tmp_path)),
              (tmp_path / "b.png", tmp_path.joinpath("b.png").relative_to(tmp_path))]  # fmt: skip
    assert output_names(images) == ["a_jpg", "a_png", "b"]


def test_stale_outputs_are_refused_and_overwrite_redoes_them(saved_models, tester, tmp_path, capsys):
    """B3: masks of another model are never reported as done; the same model and settings resume."""
    image_folder(tmp_path / "photos")
    command = ["--model", str(saved_models[0]), "--images", str(tmp_path / "photos"), "--output_dir",
               str(tmp_path / "masks"), "--device", "cpu"]  # fmt: skip
    assert run(command)["written"] == 5
    assert run(command)["done"] == 5
    WeakTrForSemanticSegmentation(tester.get_segmentation_config(initializer_range=0.5)).save_pretrained(saved_models[0])
    with pytest.raises(PredictError, match="model_sha256"):
        run(command)
    with pytest.raises(PredictError, match="scales"):
        run(command + ["--scales", "0.5"])
    assert run(command + ["--overwrite"])["written"] == 5


def test_names_are_unique_and_the_output_folder_is_not_read(saved_models, tmp_path):
    """C1: a.jpg, a.png and a_png.jpg get three names; C2: masks written inside --images are not read back."""
    images = [(tmp_path / name, tmp_path.joinpath(name).relative_to(tmp_path)) for name in ("a.jpg", "a.png", "a_png.jpg")]
    assert output_names(images) == ["a_jpg", "a_png", "a_png_2"]
    photos = tmp_path / "photos"
    image_folder(photos)
    command = ["--model", str(saved_models[0]), "--images", str(photos), "--output_dir", str(photos / "masks"),
               "--device", "cpu", "--overlays"]  # fmt: skip
    first = run(command)
    second = run(command)
    assert first["written"] == 5 and second == {"written": 0, "done": 5, "unreadable": first["unreadable"]}


def test_a_cam_model_uses_the_runs_choice_unless_a_flag_overrides(saved_models, tmp_path):
    image_folder(tmp_path / "photos")
    save_predict_settings(saved_models[1], cam="coarse_cam", cam_threshold=0.3, scales=[1.0], flip=False)
    out = tmp_path / "cams"
    run(["--model", str(saved_models[1]), "--images", str(tmp_path / "photos"), "--output_dir", str(out)])
    record = json.loads((out / "predict_record.json").read_text())
    assert (record["cam"], record["cam_threshold"], record["flip"]) == ("coarse_cam", 0.3, False)
    run(["--model", str(saved_models[1]), "--images", str(tmp_path / "photos"), "--output_dir", str(out),
         "--cam_threshold", "0.6", "--overwrite"])  # fmt: skip
    assert json.loads((out / "predict_record.json").read_text())["cam_threshold"] == 0.6


def test_the_command_exits_0_and_a_usage_error_is_one_line_with_status_2(saved_models, tmp_path, capsys, monkeypatch):
    image_folder(tmp_path / "photos")
    monkeypatch.setattr(sys, "argv", ["weaktr-predict", "--model", str(saved_models[0]), "--images",
                                      str(tmp_path / "photos"), "--output_dir", str(tmp_path / "masks")])  # fmt: skip
    assert main() is None  # the console script's sys.exit(main()) exits 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(saved_models[0]), "--images", str(tmp_path / "nothing-here"), "--output_dir",
              str(tmp_path / "masks")])  # fmt: skip
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("weaktr-predict: error:") and "nothing-here" in error and "\n" not in error
