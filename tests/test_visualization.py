import os

import numpy as np
import pytest
from PIL import Image

from weaktr_hf.visualization import (
    PALETTE,
    bar_chart,
    class_legend,
    colorize_mask,
    jet_colormap,
    load_label_png,
    overlay_cam,
    save_label_png,
    side_by_side,
    upscale,
)


def test_palette_matches_voc_colours():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert tuple(PALETTE[0]) == (0, 0, 0)  # background
    assert tuple(PALETTE[1]) == (128, 0, 0)  # aeroplane
    assert tuple(PALETTE[15]) == (192, 128, 128)  # person
    assert tuple(PALETTE[20]) == (0, 64, 128)  # tvmonitor
    assert tuple(PALETTE[255]) == (224, 224, 192)  # ignore: VOC's cream outline
    assert len({tuple(color) for color in PALETTE}) == 256  # every label its own colour


def test_colorize_mask_keeps_indices_and_attaches_palette():
    mask = np.array([[0, 1], [15, 255]])
    image = colorize_mask(mask)
    assert image.mode == "P"
    np.testing.assert_array_equal(np.array(image), mask)
    assert np.asarray(image.convert("RGB"))[1, 0].tolist() == [192, 128, 128]


def test_label_png_round_trip_is_exact_and_atomic(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, size=(13, 17)).astype(np.uint8)
    mask[0, :5] = 255
    path = tmp_path / "pseudo" / "2007_000032.png"
    save_label_png(path, mask)
    save_label_png(path, mask)  # overwriting an existing file goes through the same rename
    np.testing.assert_array_equal(load_label_png(path), mask)
    assert sorted(os.listdir(path.parent)) == ["2007_000032.png"]  # no temporary file left behind
    with Image.open(path) as image:
        assert image.mode == "P"


def test_crash_mid_write_keeps_previous_png_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "2007_000033.png"
    old = np.zeros((4, 4), dtype=np.uint8)
    save_label_png(path, old)

    def crash_after_half_a_file(self, file, *args, **kwargs):
        file.write(b"\x89PNG half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(Image.Image, "save", crash_after_half_a_file)
    with pytest.raises(KeyboardInterrupt):
        save_label_png(path, np.ones((4, 4), dtype=np.uint8))
    monkeypatch.undo()
    np.testing.assert_array_equal(load_label_png(path), old)
    assert os.listdir(tmp_path) == ["2007_000033.png"]
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(tmp_path / "bad.png", np.full((4, 4), 300))
    assert os.listdir(tmp_path) == ["2007_000033.png"]


def test_load_label_png_rejects_colour_images(tmp_path):
    path = tmp_path / "rgb.png"
    colorize_mask(np.ones((3, 3), dtype=np.uint8)).convert("RGB").save(path)
    with pytest.raises(ValueError, match="not a label PNG"):
        load_label_png(path)


def test_overlay_cam_is_rgb_at_image_size():
    image = np.full((24, 32, 3), 100, dtype=np.uint8)
    cam = np.zeros((3, 4), dtype=np.float32)
    cam[1, 2] = 1.0  # a low-resolution CAM, as at patch resolution
    overlay = overlay_cam(image, cam, alpha=0.5)
    assert overlay.mode == "RGB" and overlay.size == (32, 24)
    pixels = np.asarray(overlay)
    assert pixels.dtype == np.uint8
    assert pixels[:, :, 0].max() > pixels[0, 0, 0]  # the hot spot is redder than a cold corner
    np.testing.assert_array_equal(np.asarray(overlay_cam(image, cam, alpha=0.0)), image)
    with pytest.raises(ValueError, match="min-max normalise"):
        overlay_cam(image, cam * 3)


def test_jet_colormap_runs_blue_to_red():
    cold, hot = jet_colormap(np.array([0.0, 1.0]))
    assert cold[2] > cold[0] and hot[0] > hot[2]


def test_side_by_side_places_panels_left_to_right():
    prediction = np.zeros((10, 12), dtype=np.int64)
    truth = np.ones((8, 6), dtype=np.int64)
    photo = Image.new("RGB", (5, 10), (0, 255, 0))
    picture = side_by_side([photo, prediction, truth], titles=["image", "prediction", "ground truth"], gap=2)
    assert picture.mode == "RGB"
    assert picture.width == 5 + 12 + 6 + 2 * 2
    bottom = np.asarray(picture)[-1]
    assert bottom[0].tolist() == [0, 255, 0]
    assert bottom[5 + 2].tolist() == [0, 0, 0]  # prediction: background black
    assert bottom[5 + 2 + 12 + 2 - 1].tolist() == [255, 255, 255]  # the gap
    with pytest.raises(ValueError, match="3 titles for 2 images"):
        side_by_side([photo, truth], titles=["a", "b", "c"])


def test_upscale_is_nearest_by_an_integer_factor_and_keeps_labels():
    mask = colorize_mask(np.tile(np.array([[0, 1], [2, 3]]), (1, 20)))  # 2 x 40
    big = upscale(mask, 256)
    assert big.size == (40 * 128, 2 * 128)
    assert set(np.unique(np.asarray(big))) == {0, 1, 2, 3}  # no blended in-between labels
    photo = Image.new("RGB", (300, 400))
    assert upscale(photo, 256) is photo


def test_side_by_side_enlarges_small_panels_and_adds_a_legend():
    mask = np.zeros((64, 64), dtype=np.int64)
    mask[:, 32:] = 2
    picture = side_by_side([mask, mask], titles=["a", "b"], min_side=256, legend=["background", "disc", "square"])
    pixels = np.asarray(picture)
    assert picture.width == 2 * 256 + 4 and picture.height > 256
    legend = pixels[-class_legend(["background", "disc", "square"], picture.width).height :]
    for label in (0, 1, 2):  # every class colour appears as a swatch in the legend strip
        assert (legend == PALETTE[label]).all(-1).any(), label


def test_bar_chart_draws_bars_for_given_values_only():
    chart = np.asarray(bar_chart({"a": 60.0, "b": 20.0, "c": None}, reference=40.0, size=(400, 300)))
    above, below = (chart == (70, 130, 180)).all(-1), (chart == (214, 96, 77)).all(-1)
    assert above.sum() > below.sum() > 0  # one bar above the reference, one below, taller first
    assert above.any(0).sum() == below.any(0).sum()  # same bar width; the missing value got no bar
    with pytest.raises(ValueError, match="at least one value"):
        bar_chart({"a": None})
