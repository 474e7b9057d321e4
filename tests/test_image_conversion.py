"""One image conversion and one image frame for every step: processor (paths, URLs, PIL), training and evaluation
transforms, pseudo-labels, the CRF image, and the data loaders' mask checks (EXIF orientation applied)."""

import functools
import http.server
import json
import threading

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from conftest import WeakTrModelTester

from weaktr_hf import WeakTrForCAM
from weaktr_hf.data import BadSampleError, EvalTransform, SegmentationTrainTransform, load_coco, load_voc
from weaktr_hf.data.hub import to_wsss_schema
from weaktr_hf.data.transforms import CAMTrainTransform
from weaktr_hf.image_processing_weaktr import WeakTrImageProcessor, pil_image_to_uint8
from weaktr_hf.pseudo_labels import _default_image_transform, evaluate_pseudo_labels, write_pseudo_labels


def _palette_with_transparency():
    image = PIL.Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    image.info["transparency"] = 1
    return image


MODES = {
    "RGBA transparent": lambda: PIL.Image.new("RGBA", (6, 4), (0, 0, 0, 0)),
    "LA half alpha": lambda: PIL.Image.new("LA", (6, 4), (40, 128)),
    "P with transparency": _palette_with_transparency,
    "I;16 1000": lambda: PIL.Image.fromarray(np.full((4, 6), 1000, np.uint16)),
    "I;16 40000": lambda: PIL.Image.fromarray(np.full((4, 6), 40000, np.uint16)),
}


@pytest.mark.parametrize("make_image", MODES.values(), ids=MODES.keys())
def test_training_evaluation_and_processor_see_the_same_pixels(make_image):
    image = make_image()
    row = {"image": image, "labels": [0], "semantic_mask": PIL.Image.new("L", image.size, 1), "id": "x"}
    processor = _default_image_transform()(image)  # pseudo-labels, evaluation and inference

    evaluation = EvalTransform()(row)["pixel_values"]
    cam_training = CAMTrainTransform(input_size=(4, 6), augment="none")(row)["pixel_values"]
    seg_training = SegmentationTrainTransform(
        crop_size=(4, 6), base_size=4, scale_range=(1.0, 1.0), flip_prob=0.0, photometric=False, cat_max_ratio=1.0
    )(row)["pixel_values"]

    # 8-bit steps round 16-bit values to whole 8-bit levels: at most half a level, 0.5 / 255 / std < 0.01
    for name, values in (("eval", evaluation), ("cam train", cam_training), ("seg train", seg_training)):
        torch.testing.assert_close(values, processor, atol=0.01, rtol=0, msg=name)
    crf_image = pil_image_to_uint8(image)
    np.testing.assert_allclose(crf_image, WeakTrImageProcessor(do_resize=False, do_normalize=False, do_rescale=False)(
        image, return_tensors="pt").pixel_values[0].permute(1, 2, 0).numpy(), atol=0.5)  # fmt: skip


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server on tmp_path (no network needed): yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_converted_like_paths(http_folder, monkeypatch):
    folder, base = http_folder
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    PIL.Image.fromarray(np.full((4, 6), 1000, np.uint16)).save(folder / "g16.png")
    PIL.Image.new("RGBA", (6, 4), (0, 0, 0, 0)).save(folder / "t.png")
    processor = WeakTrImageProcessor(do_resize=False)

    for name in ("g16.png", "t.png"):
        from_path = processor(str(folder / name), return_tensors="pt").pixel_values
        from_url = processor(f"{base}/{name}", return_tensors="pt").pixel_values
        torch.testing.assert_close(from_url, from_path, atol=0, rtol=0, msg=name)


def test_eight_bit_values_in_mode_i_warn_and_la_converts():
    with pytest.warns(UserWarning, match="mode 'I' image with values in 0..255"):
        pil_image_to_uint8(PIL.Image.new("L", (3, 2), 18).convert("I"))
    premultiplied = PIL.Image.new("LA", (3, 2), (100, 255)).convert("La")
    np.testing.assert_array_equal(pil_image_to_uint8(premultiplied), np.full((2, 3, 3), 100, np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation: every step uses images as displayed (the frame `datasets` decodes them in)
# ---------------------------------------------------------------------------------------------------------------------

STORED_BLOCK = (slice(0, 12), slice(0, 16))  # a white block in the top-left of the stored 24 x 40 pixels
ORIENTATIONS = [3, 2, 6]  # 180 degrees, mirrored, 90 degrees


def stored_pixels():
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[STORED_BLOCK] = 255
    return pixels


def save_tagged_jpeg(path, orientation):
    """The stored pixels as a JPEG whose EXIF orientation tag turns them on display; returns the displayed image."""
    image = PIL.Image.fromarray(stored_pixels())
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)
    with PIL.Image.open(path) as opened:
        return PIL.ImageOps.exif_transpose(opened)


def displayed_block(image):
    return np.asarray(image.convert("L")) > 128


def assert_aligned(row):
    image, mask = row["image"], np.asarray(row["semantic_mask"])
    assert image.size == row["semantic_mask"].size
    assert (displayed_block(image) == (mask == 1)).mean() > 0.97


def write_voc(root, orientation, mask_frame="displayed"):
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    displayed = save_tagged_jpeg(root / "JPEGImages" / "a.jpg", orientation)
    block = displayed_block(displayed) if mask_frame == "displayed" else stored_pixels()[..., 0] > 128
    PIL.Image.fromarray(block.astype(np.uint8)).save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    return displayed


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_voc_masks_pair_with_images_as_displayed_in_every_step(tmp_path, orientation):
    write_voc(tmp_path / "VOC2012", orientation)

    row = load_voc(tmp_path / "VOC2012", split="train", cache_dir=str(tmp_path / "cache"))[0]

    assert_aligned(row)
    evaluation = EvalTransform()(row)
    assert evaluation["pixel_values"].shape[-2:] == evaluation["semantic_mask"].shape
    SegmentationTrainTransform(crop_size=16, base_size=16)(row)
    from_path = WeakTrImageProcessor(do_resize=False)(str(tmp_path / "VOC2012" / "JPEGImages" / "a.jpg"))
    torch.testing.assert_close(torch.as_tensor(from_path.pixel_values[0]), evaluation["pixel_values"])


def test_an_opened_image_still_carrying_its_tag_is_used_as_stored_with_a_warning(tmp_path):
    save_tagged_jpeg(tmp_path / "a.jpg", 6)
    with PIL.Image.open(tmp_path / "a.jpg") as opened:
        with pytest.warns(UserWarning, match="EXIF orientation 6 and is used as stored"):
            pixel_values = WeakTrImageProcessor(do_resize=False)(opened).pixel_values
    assert pixel_values[0].shape[-2:] == (24, 40)


def test_pseudo_labels_and_their_evaluation_use_the_displayed_frame(tmp_path):
    write_voc(tmp_path / "VOC2012", 6)
    dataset = load_voc(tmp_path / "VOC2012", split="train", cache_dir=str(tmp_path / "cache"))
    model = WeakTrForCAM(WeakTrModelTester().get_config()).eval()

    write_pseudo_labels(model, dataset, tmp_path / "pseudo", scales=(1.0,), flip=False, show_progress=False)

    with PIL.Image.open(tmp_path / "pseudo" / "a.png") as label:
        assert label.size == dataset[0]["semantic_mask"].size == (24, 40)
    assert set(evaluate_pseudo_labels(dataset, tmp_path / "pseudo", num_labels=21)) >= {"mean_iou"}


def test_voc_mask_of_the_stored_pixels_of_a_turned_image_is_refused_with_the_reason(tmp_path):
    write_voc(tmp_path / "VOC2012", 6, mask_frame="stored")

    with pytest.raises(BadSampleError, match="EXIF orientation 6"):
        load_voc(tmp_path / "VOC2012", split="train", cache_dir=str(tmp_path / "cache"))


def write_coco(root, orientation, annotation_frame):
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    displayed = save_tagged_jpeg(root / "train2014" / "COCO_train2014_000000000001.jpg", orientation)
    if annotation_frame == "stored":
        (height, width), block = (24, 40), stored_pixels()[..., 0] > 128
    else:
        (width, height), block = displayed.size, displayed_block(displayed)
    rows, cols = np.nonzero(block)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    polygon = [float(v) for v in (left, top, right, top, right, bottom, left, bottom)]
    coco = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": height, "width": width}],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [polygon], "area": 1.0}
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(coco))


@pytest.mark.parametrize(
    "orientation, annotation_frame", [(3, "stored"), (2, "stored"), (6, "stored"), (6, "displayed")]
)
def test_coco_masks_are_rendered_in_the_annotations_frame_and_turned_like_the_image(
    tmp_path, orientation, annotation_frame
):
    write_coco(tmp_path / "coco", orientation, annotation_frame)

    row = load_coco(tmp_path / "coco", split="train", cache_dir=str(tmp_path / "cache"))[0]

    assert_aligned(row)


def test_hub_mask_drawn_on_the_displayed_image_is_accepted(tmp_path):
    displayed = save_tagged_jpeg(tmp_path / "a.jpg", 6)
    PIL.Image.fromarray(displayed_block(displayed).astype(np.uint8)).save(tmp_path / "a.png")
    source = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "a.jpg")], "semantic_mask": [str(tmp_path / "a.png")]},
        features=datasets.Features({"image": datasets.Image(), "semantic_mask": datasets.Image()}),
    )

    assert_aligned(to_wsss_schema(source, class_names=["thing"])[0])
