"""PASCAL VOC loading: splits, palette masks read as indices, labels from masks or XML, and bad input."""

import logging

import datasets
import numpy as np
import PIL.Image
import pytest

from weaktr_hf.data import BadSampleError, get_class_names, get_id2label, load_wsss_dataset, wsss_features
from weaktr_hf.labels import VOC_CLASSES

HEIGHT, WIDTH = 24, 32
# id -> (mask class ids painted as stripes, where the mask lives)
TRAIN = {"2007_000032": (1, 15), "2007_000039": (20,)}
VAL = {"2007_000033": (7, 12)}
AUG_ONLY = {"2008_000002": (3,), "2008_000003": (5, 9)}
XML_ONLY = {"2009_000001": ("dog", "person", "dog")}


def voc_palette():
    """The VOC colour map: class k's colour comes from the bits of k (class 1 = (128, 0, 0), ...)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return palette


def make_mask(classes, boundary=True):
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for i, class_id in enumerate(classes):
        mask[4:20, 4 + 12 * i : 12 + 12 * i] = class_id
    if boundary:
        mask[3, :] = 255  # VOC's "void" outline
    return mask


def save_palette_png(mask, path):
    image = PIL.Image.fromarray(mask).convert("P")
    image.putpalette(voc_palette())
    image.save(path)


def write_voc(root):
    """A tiny VOCdevkit/VOC2012 folder; returns the VOC2012 path."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id in {**TRAIN, **VAL, **AUG_ONLY, **XML_ONLY}:
        PIL.Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{image_id}.jpg"
        )
    for image_id, classes in {**TRAIN, **VAL}.items():
        save_palette_png(make_mask(classes), voc / "SegmentationClass" / f"{image_id}.png")
    for image_id, classes in {**TRAIN, **VAL, **AUG_ONLY}.items():  # SBD masks: grey PNGs without outlines
        PIL.Image.fromarray(make_mask(classes, boundary=False)).save(voc / "SegmentationClassAug" / f"{image_id}.png")
    for image_id, names in XML_ONLY.items():
        objects = "".join(f"<object><name>{name}</name><difficult>0</difficult></object>" for name in names)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL) + "\n")
    (voc / "ImageSets/Segmentation/test.txt").write_text("\n".join(XML_ONLY) + "\n")
    return voc


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / "data")


def load(path, tmp_path, **kwargs):
    return load_wsss_dataset(path, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_voc_default_splits_schema_and_palette_masks_as_indices(voc, tmp_path):
    dataset = load(voc.parent.parent, tmp_path)  # the folder holding VOCdevkit works too

    assert isinstance(dataset, datasets.DatasetDict)
    assert sorted(dataset) == ["train", "train_aug", "val"]
    for split in dataset.values():
        assert split.features == wsss_features(VOC_CLASSES)
    assert get_class_names(dataset) == list(VOC_CLASSES)
    assert get_id2label(dataset, with_background=True)[0] == "background"
    assert get_id2label(dataset)[0] == "aeroplane"

    train = {row["id"]: row for row in dataset["train"]}
    assert set(train) == set(TRAIN)
    for image_id, classes in TRAIN.items():
        assert train[image_id]["labels"] == sorted(c - 1 for c in classes)
        assert train[image_id]["semantic_mask"].mode == "P"
        np.testing.assert_array_equal(np.array(train[image_id]["semantic_mask"]), make_mask(classes))
        assert train[image_id]["image"].size == (WIDTH, HEIGHT)
    assert dataset["val"]["labels"] == [[6, 11]]


def test_voc_train_aug_is_every_sbd_mask_outside_val(voc, tmp_path):
    train_aug = load(voc, tmp_path, split="train_aug")

    assert train_aug["id"] == sorted({**TRAIN, **AUG_ONLY})
    row = train_aug[train_aug["id"].index("2008_000003")]
    assert row["labels"] == [4, 8]
    np.testing.assert_array_equal(np.array(row["semantic_mask"]), make_mask((5, 9), boundary=False))


def test_voc_train_aug_list_file_wins(voc, tmp_path):
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("/JPEGImages/2008_000002.jpg /x.png\n2007_000039\n")

    assert load(voc, tmp_path, split="train_aug")["id"] == ["2008_000002", "2007_000039"]


def test_voc_labels_from_xml_where_no_mask(voc, tmp_path):
    test = load(voc, tmp_path, split="test")

    assert test["labels"] == [[VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]]
    assert test["semantic_mask"] == [None]


def test_voc_missing_split_file_names_it(voc, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/trainval\.txt"):
        load(voc, tmp_path, split="trainval")


def test_voc_not_a_voc_folder_says_what_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        from weaktr_hf.data import load_voc

        load_voc(tmp_path / "empty")


def test_voc_truncated_image_raises_naming_the_file(voc, tmp_path):
    path = voc / "JPEGImages" / "2007_000039.jpg"
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(BadSampleError, match=r"2007_000039\.jpg.*on_bad_sample='skip'"):
        load(voc, tmp_path, split="train")


def test_voc_skip_drops_bad_samples_with_a_log_line_each_and_the_count(voc, tmp_path, caplog):
    path = voc / "JPEGImages" / "2007_000039.jpg"
    path.write_bytes(b"not a jpeg")
    save_palette_png(np.zeros((HEIGHT + 1, WIDTH), np.uint8), voc / "SegmentationClass" / "2007_000032.png")

    with caplog.at_level(logging.WARNING, logger="weaktr_hf.data"):
        train = load(voc, tmp_path, split="train", on_bad_sample="skip")

    assert len(train) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("2007_000039.jpg" in m and "cannot be decoded" in m for m in messages)
    assert any("2007_000032.png is 32x25" in m and "32x24" in m for m in messages)
    assert any("skipped 2 bad sample(s) of 2" in m for m in messages)


def test_voc_mask_size_differing_from_image_is_an_error(voc, tmp_path):
    save_palette_png(np.zeros((HEIGHT, WIDTH + 2), np.uint8), voc / "SegmentationClass" / "2007_000033.png")

    with pytest.raises(BadSampleError, match=r"mask .*2007_000033\.png is 34x24 but image .* is 32x24"):
        load(voc, tmp_path, split="val")


def test_voc_class_id_outside_label_map_is_an_error(voc, tmp_path):
    save_palette_png(make_mask((7, 30)), voc / "SegmentationClass" / "2007_000033.png")

    with pytest.raises(BadSampleError, match=r"2007_000033\.png holds class ids \[30\]"):
        load(voc, tmp_path, split="val")


def test_voc_unknown_xml_class_is_an_error(voc, tmp_path):
    (voc / "Annotations" / "2009_000001.xml").write_text(
        "<annotation><object><name>unicorn</name></object></annotation>"
    )

    with pytest.raises(BadSampleError, match=r"2009_000001\.xml names classes \['unicorn'\]"):
        load(voc, tmp_path, split="test")


def test_voc_colour_mask_is_rejected(voc, tmp_path):
    colours = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)[make_mask((7,))]
    PIL.Image.fromarray(colours).save(voc / "SegmentationClass" / "2007_000033.png")

    with pytest.raises(BadSampleError, match="colours, not class indices"):
        load(voc, tmp_path, split="val")


def test_voc_save_to_disk_round_trip_keeps_classes_and_rows(voc, tmp_path):
    val = load(voc, tmp_path, split="val")
    val.save_to_disk(str(tmp_path / "saved"))

    reloaded = load_wsss_dataset(tmp_path / "saved", split="train")

    assert get_class_names(reloaded) == list(VOC_CLASSES)
    assert reloaded["id"] == val["id"] and reloaded["labels"] == val["labels"]
    np.testing.assert_array_equal(np.array(reloaded[0]["semantic_mask"]), np.array(val[0]["semantic_mask"]))


def test_split_lists_keep_dots_inside_ids(tmp_path):
    from weaktr_hf.data.voc import read_id_list

    split = tmp_path / "train.txt"
    split.write_text("scan.001\nimg_2.v2\n/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\nx.v1.PNG\n")

    assert read_id_list(split) == ["scan.001", "img_2.v2", "2007_000032", "x.v1"]
