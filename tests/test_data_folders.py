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


def test_class_names_in_another_order_than_subfolders_keep_every_image_s_class(tmp_path):
    # ImageFolder numbers class-named sub-folders in sorted order (bird, cat, dog); given names are matched by name.
    root = tmp_path / "classes"
    for i, name in enumerate(("cat", "dog", "bird")):
        save_image(root / "train" / name / f"{name}1.png", seed=i)

    dataset = load_wsss_dataset(root, class_names=["cat", "dog", "bird"])["train"]

    names = get_class_names(dataset)
    assert names == ["cat", "dog", "bird"]
    assert {sample_id.split("_", 1)[1]: [names[k] for k in labels] for sample_id, labels in
            zip(dataset["id"], dataset["labels"], strict=True)} == {"cat1": ["cat"], "dog1": ["dog"], "bird1": ["bird"]}  # fmt: skip
    with pytest.raises(
        ValueError, match=r"\['cat', 'dog', 'fox'\] are not the dataset's own class names \['bird', 'cat', 'dog'\]"
    ):
        load_wsss_dataset(root, class_names=["cat", "dog", "fox"])


def test_class_ids_in_separated_cells_are_ids_not_names_sorted_as_text(tmp_path):
    eleven = [f"class{i}" for i in range(11)]
    rows = [("a.jpg", '"0;10"'), ("b.jpg", "2"), ("c.jpg", '"1|9"')]
    root = metadata_csv_folder(tmp_path / "ids", {"train": rows})

    assert load_wsss_dataset(root, class_names=eleven)["train"]["labels"] == [[0, 10], [2], [1, 9]]
    with pytest.raises(ValueError, match=r"names no class in any row \(ids seen: \['0', '1', '2', '9', '10'\]\)"):
        load_wsss_dataset(root)
    mixed = metadata_csv_folder(tmp_path / "mixed", {"train": [("a.jpg", "cat"), ("b.jpg", '"0;1"')]})
    with pytest.raises(
        ValueError, match=r"mixes class names \(e\.g\. 'cat', split 'train' row 0, .*a\.jpg\) and class ids"
    ):
        load_wsss_dataset(mixed)


@pytest.mark.parametrize(
    "rows, class_names, message",
    [
        ([("a.jpg", "cat"), ("b.jpg", "background")], None, r"b\.jpg\) has label 'background', but background is not"),
        ([("a.jpg", "cat"), ("b.jpg", "Background")], ["cat"], r"b\.jpg\) has label 'Background', but background"),
        ([("a.jpg", "1.7"), ("b.jpg", "0")], ["cat", "dog"], r"a\.jpg\) hold 1\.7, which is not an integer class id"),
        ([("a.jpg", "cat"), ("b.jpg", "1.0")], ["cat", "dog"], r"b\.jpg\) has label '1\.0', which is not one of the"),
        ([("a.jpg", "cat"), ("b.jpg", "Cat")], None, r"one way: 'cat' \(split 'train' row 0, .*a\.jpg\) vs 'Cat' \("),
    ],
)  # fmt: skip
def test_background_non_integer_ids_and_twice_spelled_names_are_errors_naming_the_file(
    tmp_path, rows, class_names, message
):
    root = metadata_csv_folder(tmp_path / "bad", {"train": rows})

    with pytest.raises(ValueError, match=message):
        load_wsss_dataset(root, class_names=class_names)


@pytest.mark.parametrize(
    "class_names, message",
    [
        (["cat", "dog", "cat"], r"named more than once \('cat', 'cat' at positions \[0, 2\]\)"),
        (["cat", "Dog ", "dog"], r"'Dog ', 'dog' at positions \[1, 2\]"),
        (["cat", "background"], r"'background' at position 1 is the background, which is not a foreground class"),
    ],
)
def test_given_class_names_named_twice_or_background_are_refused(tmp_path, class_names, message):
    root = metadata_csv_folder(tmp_path / "photos", {"train": [("a.jpg", "cat")]})

    with pytest.raises(ValueError, match=message):
        load_wsss_dataset(root, class_names=class_names)
