"""COCO loading: masks rendered pixel-exact from polygons and RLE, crowd = 255, id mapping, and bad input."""

import json
import logging

import numpy as np
import PIL.Image
import pytest
from pycocotools import mask as mask_utils

from weaktr_hf.data import (
    BadSampleError,
    get_class_names,
    get_coco_category_ids,
    load_wsss_dataset,
    wsss_features,
)

HEIGHT, WIDTH = 16, 20
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"}]
PERSON, DOG, BOTTLE = 0, 1, 2  # contiguous labels; masks hold label + 1


def rectangle(top, left, bottom, right):
    """Polygon whose inside holds exactly the pixel centres of rows top..bottom and columns left..right."""
    return [left - 0.5, top - 0.5, right + 0.5, top - 0.5, right + 0.5, bottom + 0.5, left - 0.5, bottom + 0.5]


def uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def region(top, left, bottom, right):
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[top : bottom + 1, left : right + 1] = 1
    return mask


def expected_first_image():
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[region(0, 6, 5, 19) == 1] = 255  # crowd person...
    mask[3:9, 2:8] = DOG + 1  # ...except where the dog polygon is
    mask[10:14, 12:18] = BOTTLE + 1
    return mask


def write_coco(root, extra_annotations=(), val_image_size=(WIDTH, HEIGHT)):
    rng = np.random.default_rng(0)
    images = {"train": [(9, WIDTH, HEIGHT), (25, WIDTH, HEIGHT), (30, WIDTH, HEIGHT)], "val": [(42, *val_image_size)]}
    for split, entries in images.items():
        (root / f"{split}2014").mkdir(parents=True)
        for image_id, _, _ in entries:  # the files are HEIGHT x WIDTH whatever the json says
            PIL.Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(
                root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"
            )
    bottle_rle = mask_utils.encode(np.asfortranarray(region(10, 12, 13, 17)))
    train_annotations = [
        {"id": 1, "image_id": 9, "category_id": 18, "iscrowd": 0, "segmentation": [rectangle(3, 2, 8, 7)]},
        {
            "id": 2,
            "image_id": 9,
            "category_id": 44,
            "iscrowd": 0,
            "segmentation": {"size": [HEIGHT, WIDTH], "counts": bottle_rle["counts"].decode()},
        },
        {
            "id": 3,
            "image_id": 9,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": uncompressed_rle(region(0, 6, 5, 19)),
        },
        # image 25: a small dog listed before the large person it stands in front of
        {"id": 4, "image_id": 25, "category_id": 18, "iscrowd": 0, "segmentation": [rectangle(5, 5, 7, 7)]},
        {
            "id": 5,
            "image_id": 25,
            "category_id": 1,
            "iscrowd": 0,
            # an L shape: rows 2..12 of columns 2..9, plus rows 10..12 of columns 10..15
            "segmentation": [[1.5, 1.5, 9.5, 1.5, 9.5, 9.5, 15.5, 9.5, 15.5, 12.5, 1.5, 12.5]],
        },
        *extra_annotations,
    ]
    val_annotations = [
        {"id": 6, "image_id": 42, "category_id": 44, "iscrowd": 0, "segmentation": [rectangle(0, 0, 3, 3)]}
    ]
    (root / "annotations").mkdir()
    for split, annotations in (("train", train_annotations), ("val", val_annotations)):
        coco = {
            "images": [
                {"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "width": w, "height": h}
                for i, w, h in images[split]
            ],
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(coco))
    return root


def load(root, tmp_path, **kwargs):
    return load_wsss_dataset(root, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_coco_masks_are_pixel_exact_with_crowd_ignored_and_ids_contiguous(tmp_path):
    dataset = load(write_coco(tmp_path / "coco"), tmp_path)

    assert sorted(dataset) == ["train", "val"]
    assert dataset["train"].features == wsss_features(["person", "dog", "bottle"])
    assert get_class_names(dataset) == ["person", "dog", "bottle"]
    assert get_coco_category_ids(dataset) == [1, 18, 44]
    first = dataset["train"][0]
    assert first["id"] == "000000000009"
    assert first["labels"] == [PERSON, DOG, BOTTLE]  # the crowd-only person is in the picture
    np.testing.assert_array_equal(np.array(first["semantic_mask"]), expected_first_image())


def test_coco_smaller_instances_are_painted_over_larger_ones(tmp_path):
    train = load(write_coco(tmp_path / "coco"), tmp_path, split="train")

    second = train[1]
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    expected[2:13, 2:10] = PERSON + 1
    expected[10:13, 10:16] = PERSON + 1
    expected[5:8, 5:8] = DOG + 1
    assert second["labels"] == [PERSON, DOG]
    np.testing.assert_array_equal(np.array(second["semantic_mask"]), expected)


def test_coco_unannotated_images_are_dropped_with_a_log_or_kept_on_request(tmp_path, caplog):
    root = write_coco(tmp_path / "coco")
    with caplog.at_level(logging.WARNING, logger="weaktr_hf.data"):
        dropped = load(root, tmp_path, split="train")
    kept = load(root, tmp_path, split="train", keep_unannotated=True)

    assert dropped["id"] == ["000000000009", "000000000025"]
    assert any("left out 1 image(s) without any annotation" in r.getMessage() for r in caplog.records)
    assert kept["id"][-1] == "000000000030" and kept[-1]["labels"] == []
    assert not np.array(kept[-1]["semantic_mask"]).any()


def test_coco_raw_id_layout_keeps_the_authors_ids(tmp_path):
    train = load(write_coco(tmp_path / "coco"), tmp_path, split="train", id_layout="raw")

    assert len(get_class_names(train)) == 90 and get_class_names(train)[17] == "dog"
    assert get_coco_category_ids(train) == list(range(1, 91))
    assert train[0]["labels"] == [0, 17, 43]
    assert set(np.unique(np.array(train[0]["semantic_mask"]))) == {0, 18, 44, 255}


def test_coco_rendering_with_several_processes_matches(tmp_path):
    root = write_coco(tmp_path / "coco")
    single = load(root, tmp_path, split="train")
    parallel = load(root, tmp_path / "other", split="train", num_proc=2)

    assert parallel["id"] == single["id"] and parallel["labels"] == single["labels"]
    for a, b in zip(parallel["semantic_mask"], single["semantic_mask"], strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_coco_unknown_category_names_the_annotation(tmp_path):
    bad = {"id": 77, "image_id": 25, "category_id": 99, "iscrowd": 0, "segmentation": [rectangle(0, 0, 1, 1)]}
    root = write_coco(tmp_path / "coco", extra_annotations=[bad])

    with pytest.raises(BadSampleError, match=r"id 000000000025: annotation 77 has category_id 99"):
        load(root, tmp_path, split="train")


def test_coco_image_size_differing_from_annotations_is_an_error_or_skipped(tmp_path, caplog):
    root = write_coco(tmp_path / "coco", val_image_size=(WIDTH + 4, HEIGHT))

    with pytest.raises(
        BadSampleError, match=r"COCO_val2014_000000000042\.jpg is 20x16 but its annotation file says 24x16"
    ):
        load(root, tmp_path, split="val")
    with caplog.at_level(logging.WARNING, logger="weaktr_hf.data"):
        assert len(load(root, tmp_path, split="val", on_bad_sample="skip")) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped bad sample: id 000000000042: image" in m for m in messages)
    assert any("skipped 1 bad sample(s) of 1" in m for m in messages)


def test_coco_malformed_segmentation_names_the_annotation(tmp_path):
    bad = {"id": 78, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": {"size": [HEIGHT, WIDTH]}}
    root = write_coco(tmp_path / "coco", extra_annotations=[bad])

    with pytest.raises(BadSampleError, match="annotation 78: segmentation is neither polygons nor RLE"):
        load(root, tmp_path, split="train")


def test_coco_missing_annotation_file_names_it(tmp_path):
    root = write_coco(tmp_path / "coco")
    (root / "annotations" / "instances_val2014.json").unlink()

    with pytest.raises(FileNotFoundError, match=r"instances_val2014\.json"):
        load(root, tmp_path, split="val")


def test_coco_category_ids_survive_save_to_disk(tmp_path):
    val = load(write_coco(tmp_path / "coco"), tmp_path, split="val")
    val.save_to_disk(str(tmp_path / "saved"))

    reloaded = load_wsss_dataset(tmp_path / "saved", split="train")

    assert get_coco_category_ids(reloaded) == [1, 18, 44]
    assert reloaded["labels"] == [[BOTTLE]]
