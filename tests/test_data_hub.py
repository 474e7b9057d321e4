"""Mapping any `datasets` dataset to the WSSS schema: the Hub code path, run on save_to_disk and parquet data."""

import logging

import datasets
import numpy as np
import PIL.Image
import pytest

from weaktr_hf.data import BadSampleError, get_class_names, load_wsss_dataset, to_wsss_schema, wsss_features

NAMES = ["cat", "dog", "bird"]


def image(seed, size=(12, 10)):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def mask(classes, size=(12, 10)):
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    for i, class_id in enumerate(classes):
        array[2:8, 1 + 3 * i : 3 + 3 * i] = class_id
    array[0, 0] = 255
    return PIL.Image.fromarray(array)


def segmentation_source(masks=((1,), (2, 3), (3,)), sizes=None):
    """A dataset with its own column names, masks only (labels must come from the masks)."""
    sizes = sizes or [(12, 10)] * len(masks)
    return datasets.Dataset.from_dict(
        {
            "img": [image(i) for i in range(len(masks))],
            "seg": [mask(m, size) for m, size in zip(masks, sizes, strict=True)],
            "name": [f"sample-{i}" for i in range(len(masks))],
        },
        features=datasets.Features(
            {"img": datasets.Image(), "seg": datasets.Image(), "name": datasets.Value("string")}
        ),
    )


def classification_source(labels):
    """A dataset with image-level labels as ClassLabel ids and no masks."""
    return datasets.Dataset.from_dict(
        {"image": [image(10 + i) for i in range(len(labels))], "cls": labels},
        features=datasets.Features(
            {"image": datasets.Image(), "cls": datasets.List(datasets.ClassLabel(names=NAMES))}
        ),
    )


def test_saved_dataset_maps_columns_and_derives_labels_from_masks(tmp_path):
    segmentation_source().save_to_disk(str(tmp_path / "saved"))

    dataset = load_wsss_dataset(
        tmp_path / "saved", image_column="img", mask_column="seg", id_column="name", class_names=NAMES
    )

    assert isinstance(dataset, datasets.DatasetDict) and list(dataset) == ["train"]
    train = dataset["train"]
    assert train.features == wsss_features(NAMES)
    assert train["id"] == ["sample-0", "sample-1", "sample-2"]
    assert train["labels"] == [[0], [1, 2], [2]]
    np.testing.assert_array_equal(np.array(train[1]["semantic_mask"]), np.array(mask((2, 3))))
    np.testing.assert_array_equal(np.array(train[1]["image"]), np.array(image(1)))


def test_parquet_folder_keeps_splits_and_classlabel_names(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    classification_source([[0, 2], [1]]).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    classification_source([[2]]).to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))

    dataset = load_wsss_dataset(tmp_path / "hub", labels_column="cls", cache_dir=str(tmp_path / "cache"))

    assert sorted(dataset) == ["train", "validation"]
    assert get_class_names(dataset) == NAMES
    assert dataset["train"]["labels"] == [[0, 2], [1]]
    assert dataset["train"]["semantic_mask"] == [None, None]
    assert dataset["train"]["id"] == ["00000000", "00000001"]


def test_streaming_yields_the_same_first_samples(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    segmentation_source().to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    kwargs = dict(image_column="img", mask_column="seg", id_column="name", class_names=NAMES)

    regular = load_wsss_dataset(tmp_path / "hub", split="train", cache_dir=str(tmp_path / "cache"), **kwargs)
    streamed = load_wsss_dataset(tmp_path / "hub", split="train", streaming=True, **kwargs)

    assert isinstance(streamed, datasets.IterableDataset)
    assert get_class_names(streamed) == NAMES
    for expected, got in zip(regular, streamed, strict=True):
        assert got["id"] == expected["id"] and got["labels"] == expected["labels"]
        np.testing.assert_array_equal(np.array(got["image"]), np.array(expected["image"]))
        np.testing.assert_array_equal(np.array(got["semantic_mask"]), np.array(expected["semantic_mask"]))


def test_in_memory_dataset_and_schema_round_trip(tmp_path):
    mapped = load_wsss_dataset(classification_source([[1], [0, 1]]), labels_column="cls")
    mapped.save_to_disk(str(tmp_path / "again"))

    reloaded = load_wsss_dataset(tmp_path / "again", split="train")  # already in the schema: nothing to name

    assert get_class_names(reloaded) == NAMES
    assert reloaded["labels"] == [[1], [0, 1]]


def test_missing_column_is_named_with_the_available_ones():
    with pytest.raises(
        ValueError, match=r"mask column 'annotation' is not in the dataset \(columns: \['img', 'seg', 'name'\]\)"
    ):
        load_wsss_dataset(segmentation_source(), image_column="img", mask_column="annotation", class_names=NAMES)


def test_unknown_class_names_are_asked_for():
    with pytest.raises(ValueError, match=r"pass class_names="):
        load_wsss_dataset(segmentation_source(), image_column="img", mask_column="seg")


def test_mask_class_outside_label_map_and_mask_size_mismatch_are_errors():
    with pytest.raises(BadSampleError, match=r"holds class ids \[7\]"):
        load_wsss_dataset(
            segmentation_source(masks=((1,), (7,))), image_column="img", mask_column="seg", class_names=NAMES
        )
    with pytest.raises(BadSampleError, match=r"mask of sample 00000001 is 14x10 but its image is 12x10"):
        load_wsss_dataset(
            segmentation_source(masks=((1,), (2,)), sizes=[(12, 10), (14, 10)]),
            image_column="img",
            mask_column="seg",
            class_names=NAMES,
        )


def test_label_ids_outside_class_names_are_errors_and_skip_logs_each(caplog):
    source = datasets.Dataset.from_dict({"image": [image(0), image(1), image(2)], "cls": [[0], [5], [1, -1]]})

    with pytest.raises(BadSampleError, match=r"labels of sample 00000001 hold class ids \[5\]"):
        load_wsss_dataset(source, labels_column="cls", class_names=NAMES)
    with caplog.at_level(logging.WARNING, logger="weaktr_hf.data"):
        kept = load_wsss_dataset(source, labels_column="cls", class_names=NAMES, on_bad_sample="skip")

    assert kept["id"] == ["00000000"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipped bad sample" in m for m in messages) == 2
    assert any("skipped 2 bad sample(s) of 3" in m for m in messages)


def test_corrupt_image_bytes_are_an_error():
    source = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"\x89PNG broken", "path": None}], "labels": [[0]]},
        features=datasets.Features({"image": datasets.Image(), "labels": datasets.List(datasets.Value("int64"))}),
    )
    with pytest.raises(BadSampleError, match="image of sample 00000000 cannot be decoded"):
        load_wsss_dataset(source, class_names=NAMES)


def test_streaming_skip_logs_bad_samples_as_they_pass(tmp_path, caplog):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    segmentation_source(masks=((1,), (9,), (2,))).to_parquet(str(tmp_path / "hub" / "data" / "train-0.parquet"))
    kwargs = dict(image_column="img", mask_column="seg", id_column="name", class_names=NAMES, streaming=True)

    with caplog.at_level(logging.WARNING, logger="weaktr_hf.data"):
        ids = [row["id"] for row in load_wsss_dataset(tmp_path / "hub", split="train", on_bad_sample="skip", **kwargs)]
    assert ids == ["sample-0", "sample-2"]
    assert any("sample-1" in r.getMessage() and "1 skipped so far" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadSampleError, match=r"holds class ids \[9\]"):
        list(load_wsss_dataset(tmp_path / "hub", split="train", **kwargs))


def test_single_label_classlabel_column_is_a_one_element_label_list():
    """Image-classification datasets hold one `ClassLabel` per image: its names are the classes, its id the label."""
    source = datasets.Dataset.from_dict(
        {"image": [image(20), image(21)], "label": [2, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}),
    )

    dataset = to_wsss_schema(source, labels_column="label")

    assert get_class_names(dataset) == NAMES
    assert dataset["labels"] == [[2], [0]]
    with_names = to_wsss_schema(source, labels_column="label", class_names=NAMES)
    assert with_names["labels"] == [[2], [0]]


def test_labels_that_are_not_class_ids_name_what_is_expected():
    # Class names are label values too (users' metadata files hold names); anything else is named with the choices.
    assert to_wsss_schema(datasets.Dataset.from_dict({"image": [image(22)], "labels": [["cat"]]}), class_names=NAMES)[
        "labels"
    ] == [[0]]
    source = datasets.Dataset.from_dict({"image": [image(22)], "labels": [["kitten"]]})

    with pytest.raises(BadSampleError, match=r"label 'kitten', which is not one of the class names \['cat', 'dog'"):
        to_wsss_schema(source, class_names=NAMES)


def test_array_image_column_is_encoded_as_images():
    pixels = np.random.default_rng(3).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    source = datasets.Dataset.from_dict(
        {"image": [pixels], "labels": [[1]]},
        features=datasets.Features(
            {"image": datasets.Array3D((8, 6, 3), "uint8"), "labels": datasets.List(datasets.Value("int64"))}
        ),
    )

    dataset = to_wsss_schema(source, class_names=NAMES)

    np.testing.assert_array_equal(np.array(dataset[0]["image"]), pixels)
    floats = datasets.Dataset.from_dict({"image": [pixels.astype(np.float32)], "labels": [[1]]})
    with pytest.raises(BadSampleError, match="an image array must hold 8-bit values"):
        to_wsss_schema(floats, class_names=NAMES)


def test_given_class_names_in_another_order_renumber_classlabel_ids_and_masks():
    # A WSSS-schema dataset names its ids itself (cat, dog, bird); given as bird, cat, dog, its labels and masks
    # follow the given order, so every pixel keeps its class's name.
    source = datasets.Dataset.from_dict(
        {
            "image": [image(30), image(31)],
            "labels": [[0, 2], [1]],
            "semantic_mask": [mask((1, 3)), mask((2,))],
            "id": ["x", "y"],
        },
        features=wsss_features(NAMES),
    )

    dataset = to_wsss_schema(source, class_names=["bird", "cat", "dog"])

    assert get_class_names(dataset) == ["bird", "cat", "dog"]
    assert dataset["labels"] == [[0, 1], [2]]  # cat + bird, dog
    np.testing.assert_array_equal(np.array(dataset[0]["semantic_mask"]), np.array(mask((2, 1))))
    np.testing.assert_array_equal(np.array(dataset[1]["semantic_mask"]), np.array(mask((3,))))
    with pytest.raises(ValueError, match=r"given class names \['cat', 'dog'\] are not the dataset's own"):
        to_wsss_schema(source, class_names=["cat", "dog"])
