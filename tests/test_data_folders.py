"""Users' own data through `datasets`' builders: ImageFolder with metadata.csv / metadata.jsonl, class-named subfolders,
a saved dataset with its own column names; label names mapped to ids; bad rows named by their file."""

import json
import logging

import datasets
import numpy as np
import PIL.Image
import pytest

from weaktr_hf.data import BadSampleError, get_class_names, load_wsss_dataset


def save_image(path, seed, size=(14, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(array).convert(mode).save(path)


def metadata_csv_folder(root, rows_by_split):
    """`root/<split>/` images plus a metadata.csv of `file_name,labels` (labels written as given)."""
    for split, rows in rows_by_split.items():
        for i, (name, _) in enumerate(rows):
            save_image(root / split / name, seed=hash((split, i)) % 1000)
        lines = ["file_name,labels"] + [f"{name},{labels}" for name, labels in rows]
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_metadata_csv_with_train_val_folders_maps_names_to_ids(tmp_path):
    root = metadata_csv_folder(tmp_path / "photos", {
        "train": [("a.jpg", "cat;dog"), ("b.png", '"[""dog""]"'), ("c.jpg", "[]"), ("d.jpg", "\"bird, cat\"")],
        "val": [("e.jpg", "bird")],
    })  # fmt: skip

    given = load_wsss_dataset(root, class_names=["dog", "cat", "bird"])
    inferred = load_wsss_dataset(root)

    assert sorted(given) == ["train", "validation"]  # ImageFolder names a val/ folder "validation"
    assert given["train"]["labels"] == [[0, 1], [0], [], [1, 2]] and given["validation"]["labels"] == [[2]]
    assert get_class_names(given) == ["dog", "cat", "bird"]
    # Without class names: the names the column uses, sorted, the same for every split.
    assert get_class_names(inferred["train"]) == get_class_names(inferred["validation"]) == ["bird", "cat", "dog"]
    assert inferred["train"]["labels"] == [[1, 2], [2], [], [0, 1]]
    assert given["train"]["id"] == ["00000000_a", "00000001_b", "00000002_c", "00000003_d"]
    assert given["train"][0]["image"].size == (14, 10) and given["train"][0]["semantic_mask"] is None


def test_metadata_jsonl_with_lists_of_names_and_one_class(tmp_path):
    root = tmp_path / "jsonl"
    rows = [{"file_name": "x.png", "objects": ["leaf"]}, {"file_name": "y.png", "objects": []}]
    for i, row in enumerate(rows):
        save_image(root / row["file_name"], seed=i)
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    dataset = load_wsss_dataset(root, labels_column="objects", class_names=["leaf"])

    assert list(dataset) == ["train"]
    assert dataset["train"]["labels"] == [[0], []] and get_class_names(dataset) == ["leaf"]


def test_class_named_subfolders_give_one_label_per_image(tmp_path):
    root = tmp_path / "classes"
    for class_index, name in enumerate(("cat", "dog")):
        for i in range(2):
            save_image(root / name / f"{name}{i}.jpg", seed=10 * class_index + i)

    dataset = load_wsss_dataset(root)["train"]

    assert get_class_names(dataset) == ["cat", "dog"]
    assert sorted(zip(dataset["id"], dataset["labels"])) == [
        ("00000000_cat0", [0]), ("00000001_cat1", [0]), ("00000002_dog0", [1]), ("00000003_dog1", [1]),
    ]  # fmt: skip


def test_saved_dataset_with_other_column_names_and_name_strings(tmp_path):
    images = [PIL.Image.new("RGB", (9, 7), (i * 40, 0, 0)) for i in range(3)]
    source = datasets.Dataset.from_dict(
        {"photo": images, "tags": ["sky|sea", "sea", ""]},
        features=datasets.Features({"photo": datasets.Image(), "tags": datasets.Value("string")}),
    )
    source.save_to_disk(str(tmp_path / "saved"))

    dataset = load_wsss_dataset(tmp_path / "saved", image_column="photo", labels_column="tags")["train"]

    assert get_class_names(dataset) == ["sea", "sky"] and dataset["labels"] == [[0, 1], [0], []]


def test_bad_rows_name_their_file_or_are_skipped_with_a_log_line(tmp_path, caplog):
    root = metadata_csv_folder(tmp_path / "bad", {"train": [("ok.jpg", "cat"), ("typo.jpg", "cta"), ("gap.jpg", "")]})
    (root / "train" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with open(root / "train" / "metadata.csv", "a") as handle:
        handle.write("broken.jpg,cat\n")

    with pytest.raises(BadSampleError, match=r"typo\.jpg\) has label 'cta', which is not one of the class names"):
        load_wsss_dataset(root, class_names=["cat", "dog"])
    unknown_only = metadata_csv_folder(tmp_path / "gap", {"train": [("gap.jpg", "")]})
    with pytest.raises(BadSampleError, match=r"gap\.jpg\) has no value in the labels column; write \[\]"):
        load_wsss_dataset(unknown_only, class_names=["cat"])
    with caplog.at_level(logging.WARNING, logger="weaktr_hf.data"):
        kept = load_wsss_dataset(root, class_names=["cat", "dog"], on_bad_sample="skip")["train"]

    assert kept["labels"] == [[0]] and kept["id"][0].endswith("_ok")
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "typo.jpg" in messages and "gap.jpg" in messages and "broken.jpg) cannot be decoded" in messages
    assert "skipped 3 bad sample(s) of 4" in messages
