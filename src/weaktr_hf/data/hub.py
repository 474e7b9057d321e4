"""Any `datasets` dataset (from the Hub, `save_to_disk`, or parquet files) mapped to the WSSS schema.

The caller names the image, mask and label columns. Image-level labels come from the label column or, without one,
from the mask (0 background, k + 1 for class k, 255 ignore). Class names come from `class_names=`, else from the
label column's `ClassLabel` names, else from what `load_wsss_dataset` recorded, else (a label column of class-name
strings) from the names the data uses, sorted. A dataset that names its classes itself keeps them: `class_names=` in
another order are matched by name (its ids and masks are renumbered to the given order), and other names are refused.

A label value is a class id, a class name, or a list of either; a string holding several is a JSON list
(`'["cat", "dog"]'`) or values separated by `;`, `,` or `|` (`"cat;dog"`, `"0;10"`: digits are class ids, never
names); `"[]"` or `""` means background only, and `background` is not a label. This
reads the `metadata.csv` / `metadata.jsonl` of `datasets`' ImageFolder layout (`file_name` plus a labels column) and
its class-named subfolders (a single `ClassLabel` column, `label`). A missing value (an empty CSV cell) is an error, so
that a forgotten row is not silently taken for a background-only image.
"""

import json
import logging
import math
import re
from pathlib import Path

import datasets
import numpy as np

from ..labels import BACKGROUND
from .schema import (
    ERROR_COLUMN,
    BadSampleError,
    as_class_id,
    check_image,
    check_labels,
    check_mask_size,
    check_on_bad_sample,
    encode_mask_png,
    features_with_error_column,
    find_class_names,
    get_metadata,
    labels_from_mask,
    mask_to_array,
    metadata_description,
    open_image,
    resolve_bad_samples,
    wsss_features,
)

logger = logging.getLogger(__name__)


def is_saved_dataset(path):
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _class_names_from(dataset, labels_column, class_names):
    """The foreground class names of a split, and the map from the dataset's own class ids to theirs (or None).

    A dataset that names its classes itself (a `ClassLabel` label column, or names recorded by `load_wsss_dataset`)
    keeps the name of every id: given names in another order are mapped by name (own id k becomes the given index of
    own name k), and given names that are not the same set are refused with both lists.
    """
    own = find_class_names(dataset, labels_column)
    if class_names is None:
        if own:
            return own, None
        raise ValueError(
            f"cannot tell the foreground class names of this dataset (label column {labels_column!r} is not a "
            "ClassLabel or a list of ClassLabel, and no names were recorded); pass class_names=[...] in label order "
            "0..C-1 (background excluded)."
        )
    class_names = list(class_names)
    if not own or own == class_names:
        return class_names, None
    if sorted(own) != sorted(class_names):
        raise ValueError(
            f"the given class names {class_names} are not the dataset's own class names {own} (the names of its "
            f"{labels_column!r} column's ids, e.g. class-named sub-folders in sorted order); give the same names in "
            "any order (they are matched by name), or leave the class names out (train.py --class_names) to use the "
            "dataset's."
        )
    logger.info("class names mapped by name from the dataset's order %s to the given order %s", own, class_names)
    return class_names, [class_names.index(name) for name in own]


def _own_to_given_mask(mask, id_map):
    """A class-index mask (0 background, k + 1 own class k, 255 ignore) renumbered to the given class order."""
    lookup = np.arange(256, dtype=np.int64)
    lookup[1 : len(id_map) + 1] = np.asarray(id_map) + 1
    inside = (mask >= 0) & (mask <= 255)  # other values are left for `labels_from_mask` to report
    return np.where(inside, lookup[np.clip(mask, 0, 255)], mask)


LABEL_NAME_SEPARATORS = r"[;,|]"
LABEL_COLUMN_DEFAULTS = ("labels", "label")  # the schema's name, then ImageFolder's for class-named subfolders


def split_label_value(value, name):
    """One row's label value as a list of class ids and/or class names (see the module docstring for the formats)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadSampleError(
            f"{name} has no value in the labels column; write [] (or an empty string in JSON lines) for an image with "
            "background only"
        )
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [part.strip() for part in re.split(LABEL_NAME_SEPARATORS, text) if part.strip()]
        try:
            value = json.loads(text)
        except ValueError as error:
            raise BadSampleError(f"{name} has labels {value!r}, which is not a valid JSON list ({error})") from error
        if not isinstance(value, list):
            raise BadSampleError(f"{name} has labels {text!r}; a JSON label value must be a list")
    if np.ndim(value) == 0:
        return [value]
    return list(value)


def is_id_token(value):
    """Whether a label string is a class id written as digits (`"10"`), rather than a class name."""
    return isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()) is not None


def is_background_name(value):
    """Whether a label string names the background (any case), which is label 0 of the masks and no class."""
    return isinstance(value, str) and value.strip().casefold() == BACKGROUND


def label_names_to_ids(values, label2id, name, id_map=None):
    """One row's label values as ids 0..C-1 in the order of `label2id`.

    A string is a class name, or else (all digits, e.g. from `"0;10"`) a class id; ids are the dataset's own, renumbered
    by `id_map` where the given names order them differently. Unknown names, the background's name and non-integer
    ids are errors naming the sample (`name`: its id and file).
    """
    ids = []
    for value in values:
        if isinstance(value, str) and value.strip() in label2id:
            ids.append(label2id[value.strip()])
            continue
        if is_background_name(value):
            raise BadSampleError(
                f"{name} has label {value!r}, but background is not a foreground class (it is label 0 of the masks); "
                "write [] for an image with background only, and leave it out of rows that name classes"
            )
        if isinstance(value, str) and not is_id_token(value):
            raise BadSampleError(
                f"{name} has label {value!r}, which is not one of the class names {list(label2id)} nor a class id; fix "
                "the row, or add the name to the class names (train.py --class_names, or class_names=)"
            )
        class_id = int(value) if isinstance(value, str) else as_class_id(value, name)
        ids.append(id_map[class_id] if id_map is not None and 0 <= class_id < len(id_map) else class_id)
    return ids


def _holds_strings(feature):
    """Whether a label column's feature holds class-name strings (a string, or a list of strings)."""
    feature = getattr(feature, "feature", feature)
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def infer_label_names(splits, labels_column):
    """The sorted class names used by a string label column across all splits (datasets in memory, not streaming).

    Digit strings are class ids, not names: a column of ids needs its names given, and a column mixing names and ids
    is refused, as its ids would index names sorted by text. Names spelled two ways (`Cat`, `cat`) are refused with the
    rows that use each spelling.
    """
    names, ids = {}, {}  # name or id -> the first (split, row) that uses it
    for split_name, dataset in splits.items():
        for index, value in enumerate(dataset[labels_column]):
            try:
                values = split_label_value(value, f"row {index}")
            except BadSampleError:
                continue  # reported with the file's name when the row is mapped
            for v in values:
                if is_id_token(v) or not isinstance(v, str):
                    ids.setdefault(str(v).strip(), (split_name, index))
                elif not is_background_name(v):  # reported with the file's name when the row is mapped
                    names.setdefault(v.strip(), (split_name, index))

    def at(place):
        split_name, index = place
        return f"split {split_name!r} row {index}{_row_file(splits[split_name], index)}"

    spellings = {}
    for name in names:
        spellings.setdefault(name.casefold(), []).append(name)
    twice = [spelled for spelled in spellings.values() if len(spelled) > 1]
    if twice:
        raise ValueError(
            f"the label column {labels_column!r} spells a class name more than one way: "
            + "; ".join(" vs ".join(f"{n!r} ({at(names[n])})" for n in spelled) for spelled in twice)
            + "; write one spelling, or pass class_names=[...] (train.py --class_names) naming each once."
        )
    if names and ids:
        name, id_ = next(iter(names)), next(iter(ids))
        raise ValueError(
            f"the label column {labels_column!r} mixes class names (e.g. {name!r}, {at(names[name])}) and class ids "
            f"(e.g. {id_}, {at(ids[id_])}); ids only have a meaning given the names in id order: pass class_names=[...] "
            "(train.py --class_names), or write names only."
        )
    if not names:
        seen = f" (ids seen: {sorted(ids, key=lambda v: (len(v), v))[:20]})" if ids else ""  # "2" before "10"
        raise ValueError(
            f"the label column {labels_column!r} names no class in any row{seen}; pass class_names=[...] (train.py "
            "--class_names) with the names of ids 0, 1, ... in order."
        )
    logger.info("class names from the %r column, sorted: %s", labels_column, sorted(names))
    return sorted(names)


def _row_file(dataset, index):
    """`", <image file>"` of one row of a split whose `image` column holds files, else `""` (for error messages)."""
    try:
        image = dataset.select([index]).cast_column("image", datasets.Image(decode=False))[0]["image"]
        return f", {image['path']}" if image.get("path") else ""
    except (KeyError, TypeError, ValueError):  # no image column with files: the split and row still name the row
        return ""


def shared_class_names(splits, labels_column=None, class_names=None):
    """One list of class names for every split: as given, else (a string label column) inferred over all splits.

    Returns None when the names are to come from each split's `ClassLabel` feature or recorded metadata instead.
    """
    if class_names is not None or not splits:
        return class_names
    first = next(iter(splits.values()))
    column = labels_column or next((c for c in LABEL_COLUMN_DEFAULTS if c in (first.features or {})), None)
    if column is None or not _holds_strings((first.features or {}).get(column)):
        return None
    if any(isinstance(ds, datasets.IterableDataset) for ds in splits.values()):
        raise ValueError(
            f"the label column {column!r} holds class names; with streaming=True pass class_names=[...] in label "
            "order, as they cannot be collected from the data first."
        )
    return infer_label_names(splits, column)


def _storage(value, name, is_mask=True):
    """A `datasets.Image` storage dict for an image/mask value: undecoded storage, a PIL image, or an array.

    Arrays are encoded as PNG: a mask must be (height, width) of class indices 0..255; an image (height, width) or
    (height, width, 3 or 4) of integer values 0..255 (`datasets` hands array columns to `map` as nested lists).
    """
    if value is None:
        return None
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    if hasattr(value, "mode"):  # an already decoded PIL image (e.g. an IterableDataset that ignored the cast)
        return value
    array = np.asarray(value)
    if not is_mask:
        shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
        values_ok = array.size and np.issubdtype(array.dtype, np.integer) and 0 <= array.min() <= array.max() <= 255
        if not (shape_ok and values_ok):
            raise BadSampleError(
                f"{name} is an array of shape {array.shape} and dtype {array.dtype}; an image array must hold 8-bit "
                "values 0..255 as (height, width), (height, width, 3) or (height, width, 4)"
            )
        return encode_mask_png(array)
    if array.ndim != 2:
        raise BadSampleError(f"{name} is an array of shape {array.shape}; a mask must be (height, width)")
    if array.min() < 0 or array.max() > 255:
        raise BadSampleError(f"{name} holds values outside 0..255; masks are stored as 8-bit class indices")
    return encode_mask_png(array)


def _sample_id(example, index, image_column, id_column):
    """The id column's value; else the row index, followed by the file's stem when the image is a file."""
    if id_column:
        return str(example[id_column])
    value = example[image_column]
    path = value.get("path") if isinstance(value, dict) else None
    return f"{index:08d}_{Path(path).stem}" if path else f"{index:08d}"


def _example_to_schema(
    example, index, image_column, mask_column, labels_column, id_column, num_classes, verify, label2id=None, id_map=None
):
    """One row of the source dataset -> a schema row, with the reason it is unusable (or None)."""
    sample_id = _sample_id(example, index, image_column, id_column)
    row = {"image": None, "semantic_mask": None, "labels": [], "id": sample_id, ERROR_COLUMN: None}
    path = example[image_column].get("path") if isinstance(example[image_column], dict) else None
    where = f"sample {sample_id}" + (f" ({path})" if path else "")  # names the file in errors, where there is one
    try:
        row["image"] = _storage(example[image_column], f"image of sample {sample_id}", is_mask=False)
        if row["image"] is None:
            raise BadSampleError(f"sample {sample_id} has no image in column {image_column!r}")
        image_size = check_image(row["image"], f"of {where}", verify)
        mask_labels = None
        if mask_column and example[mask_column] is not None:
            row["semantic_mask"] = _storage(example[mask_column], f"mask of sample {sample_id}")
            mask = open_image(row["semantic_mask"])
            mask.load()
            check_mask_size(mask, row["image"], image_size, f"the mask of sample {sample_id}", "its image")
            mask_array = mask_to_array(mask, f"of sample {sample_id}")
            if id_map is not None:
                mask_array = _own_to_given_mask(mask_array, id_map)
            mask_labels = labels_from_mask(mask_array, num_classes, f"of {sample_id}")
            if id_map is not None:
                row["semantic_mask"] = encode_mask_png(mask_array)
        if labels_column:
            values = split_label_value(example[labels_column], where)
            ids = label_names_to_ids(values, label2id or {}, where, id_map)
            row["labels"] = check_labels(ids, num_classes, where)
        elif mask_labels is not None:
            row["labels"] = mask_labels
        else:
            raise BadSampleError(
                f"sample {sample_id} has no mask and no label column, so its image-level labels are unknown"
            )
    except BadSampleError as error:
        row.update(image=None, semantic_mask=None, labels=[], **{ERROR_COLUMN: str(error)})
    return row


def _resolve_columns(dataset, image_column, mask_column, labels_column, id_column):
    columns = list(dataset.column_names or (dataset.features or {}).keys())

    def check(role, column):
        if column is not None and column not in columns:
            raise ValueError(
                f"{role} column {column!r} is not in the dataset (columns: {columns}); pass {role}_column=."
            )
        return column

    image_column = check("image", image_column)
    mask_column = check(
        "mask", mask_column if mask_column else ("semantic_mask" if "semantic_mask" in columns else None)
    )
    default_labels = next((name for name in LABEL_COLUMN_DEFAULTS if name in columns), None)
    labels_column = check("labels", labels_column if labels_column else default_labels)
    id_column = check("id", id_column if id_column else ("id" if "id" in columns else None))
    if mask_column is None and labels_column is None:
        raise ValueError(
            f"the dataset has neither a mask nor an image-level label column (columns: {columns}); pass "
            "mask_column= and/or labels_column=."
        )
    return columns, image_column, mask_column, labels_column, id_column


def _streaming_filter(split, on_bad_sample):
    skipped = [0]

    def keep(example):
        reason = example[ERROR_COLUMN]
        if reason is None:
            return True
        if on_bad_sample == "raise":
            raise BadSampleError(
                f"split {split!r}: {reason}. Fix the sample, or pass on_bad_sample='skip' to drop bad samples with a "
                "log line each."
            )
        skipped[0] += 1
        logger.warning("split %r: skipped bad sample: %s (%d skipped so far)", split, reason, skipped[0])
        return False

    return keep


def to_wsss_schema(
    dataset,
    image_column="image",
    mask_column=None,
    labels_column=None,
    id_column=None,
    class_names=None,
    split="train",
    verify_images=True,
    on_bad_sample="raise",
    num_proc=None,
):
    """Map one split (`Dataset` or `IterableDataset`) to the WSSS schema.

    `mask_column` / `labels_column` / `id_column` default to `semantic_mask` / `labels` / `id` when such columns
    exist; ids default to the row index. Streaming splits check samples as they stream: `"skip"` logs each one and the
    running count, `"raise"` stops at the first.
    """
    check_on_bad_sample(on_bad_sample)
    columns, image_column, mask_column, labels_column, id_column = _resolve_columns(
        dataset, image_column, mask_column, labels_column, id_column
    )
    names, id_map = _class_names_from(dataset, labels_column, class_names)
    metadata = {k: v for k, v in get_metadata(dataset).items() if k != "class_names"}
    features = wsss_features(names)
    for column in (image_column, mask_column):
        if column and isinstance((dataset.features or {}).get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    fn_kwargs = {
        "image_column": image_column,
        "mask_column": mask_column,
        "labels_column": labels_column,
        "id_column": id_column,
        "num_classes": len(names),
        "verify": verify_images,
        "label2id": {name: i for i, name in enumerate(names)},  # label values may be class names
        "id_map": id_map,  # the dataset's own class ids -> the given names' order (None: the same)
    }
    map_kwargs = {
        "with_indices": True,
        "fn_kwargs": fn_kwargs,
        "remove_columns": columns,
        "features": features_with_error_column(features),
    }
    if isinstance(dataset, datasets.IterableDataset):
        mapped = dataset.map(_example_to_schema, **map_kwargs)
        mapped = mapped.filter(_streaming_filter(split, on_bad_sample)).remove_columns(ERROR_COLUMN)
        mapped.info.description = metadata_description(names, **metadata)
        return mapped
    mapped = dataset.map(_example_to_schema, num_proc=num_proc, desc=f"Mapping split {split!r}", **map_kwargs)
    mapped = resolve_bad_samples(mapped, split, on_bad_sample)
    mapped.info.description = metadata_description(names, **metadata)
    return mapped


def load_hub_dataset(
    source,
    split=None,
    image_column="image",
    mask_column=None,
    labels_column=None,
    id_column=None,
    class_names=None,
    streaming=False,
    verify_images=True,
    on_bad_sample="raise",
    num_proc=None,
    cache_dir=None,
    **load_dataset_kwargs,
):
    """Load a Hub dataset id, a `save_to_disk` folder or a folder of data files, and map it to the WSSS schema.

    Hub ids and data folders go through `datasets.load_dataset(source, ...)` (extra keyword arguments are passed to
    it); `save_to_disk` folders through `datasets.load_from_disk`. Returns a `Dataset` / `IterableDataset` for one
    split name, else a `DatasetDict` / `IterableDatasetDict`.
    """
    check_on_bad_sample(on_bad_sample)
    if is_saved_dataset(source):
        loaded = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            missing = [s for s in wanted if s not in loaded]
            if missing:
                raise ValueError(f"splits {missing} are not in {source} (it has {list(loaded)}); pass split=.")
            loaded = datasets.DatasetDict({s: loaded[s] for s in wanted})
        if streaming:
            loaded = datasets.IterableDatasetDict({name: ds.to_iterable_dataset() for name, ds in loaded.items()})
    else:
        loaded = datasets.load_dataset(
            str(source), split=split, streaming=streaming, cache_dir=cache_dir, **load_dataset_kwargs
        )
    single = isinstance(loaded, (datasets.Dataset, datasets.IterableDataset))
    splits = {split: loaded} if single else dict(loaded)
    single = isinstance(split, str)
    class_names = shared_class_names(splits, labels_column, class_names)
    # Keep the features of the source: `to_iterable_dataset` and streaming parquet keep them, so ClassLabel names
    # and Image columns are visible to the mapping.
    mapped = {
        name: to_wsss_schema(
            ds,
            image_column=image_column,
            mask_column=mask_column,
            labels_column=labels_column,
            id_column=id_column,
            class_names=class_names,
            split=name,
            verify_images=verify_images,
            on_bad_sample=on_bad_sample,
            num_proc=None if streaming else num_proc,
        )
        for name, ds in splits.items()
    }
    if single:
        return mapped[split]
    return datasets.IterableDatasetDict(mapped) if streaming else datasets.DatasetDict(mapped)
