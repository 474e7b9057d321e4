"""Datasets for weakly-supervised semantic segmentation, all in one schema, plus transforms and collators.

`load_wsss_dataset(source, split=None, ...)` reads PASCAL VOC 2012 or MS COCO from a local folder, any `datasets`
dataset (Hub id, `save_to_disk` folder, parquet files), or builds the synthetic dataset, and returns rows of
`image`, `labels` (foreground class ids 0..C-1), `semantic_mask` (0 background, k + 1 class k, 255 ignore; None
where absent) and `id`. `get_class_names` / `get_id2label` give the classes for step 1 (foreground) and step 2
(`with_background=True`).
"""

import os
from pathlib import Path

import datasets

from .coco import get_coco_category_ids, is_coco_root, load_coco, render_coco_semantic_mask
from .collators import IMAGE_IDS_KEY, CAMCollator, SegmentationCollator
from .hub import load_hub_dataset, shared_class_names, to_wsss_schema
from .schema import (
    BadSampleError,
    check_class_names,
    get_class_names,
    get_id2label,
    get_label2id,
    get_metadata,
    mask_to_array,
    wsss_features,
)
from .synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_CONFIGURATIONS,
    load_synthetic,
    make_synthetic_split,
    trivial_baseline_miou,
    trivial_baseline_prediction,
)
from .transforms import (
    CAMTrainTransform,
    EvalTransform,
    PhotoMetricDistortion,
    SegmentationTrainTransform,
    as_dataset_transform,
)
from .voc import find_voc_root, load_voc

_DATASET_TYPES = (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)


def _to_iterable(dataset):
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.IterableDatasetDict({name: split.to_iterable_dataset() for name, split in dataset.items()})
    return dataset.to_iterable_dataset()


def _looks_local(source):
    # Hub ids are "name" or "owner/name"; anything with more parts, or anchored, is a local path
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1


def load_wsss_dataset(source="synthetic", split=None, streaming=False, **kwargs):
    """Load a WSSS dataset from any supported source into the common schema.

    `source` is one of:
      - `"synthetic"`: the built-in dataset (`num_classes`, `image_size`, `num_train`, `num_val`, `seed`);
      - a local PASCAL VOC 2012 folder (`VOCdevkit/VOC2012` or a parent; see `weaktr_hf.data.voc`);
      - a local COCO folder with `annotations/instances_<split><year>.json` (see `weaktr_hf.data.coco`);
      - a `save_to_disk` folder, a folder of data files (e.g. parquet), or a Hub dataset id, mapped with
        `image_column`, `mask_column`, `labels_column`, `id_column`, `class_names` (see `weaktr_hf.data.hub`);
      - a `datasets.Dataset` / `DatasetDict` (or iterable one) already in memory, mapped the same way.

    Keyword arguments go to the loader of that source (e.g. `on_bad_sample="skip"`, `num_proc`, `cache_dir`).
    Returns a `Dataset` for one split name, else a `DatasetDict` (iterable versions with `streaming=True`).
    """
    if isinstance(source, _DATASET_TYPES):
        if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
            return to_wsss_schema(source, split=split or "train", **kwargs)
        names = list(source) if split is None else ([split] if isinstance(split, str) else list(split))
        # Class names given as strings in the label column are collected over all splits, so ids agree across them.
        kwargs["class_names"] = shared_class_names(
            {name: source[name] for name in names}, kwargs.get("labels_column"), kwargs.get("class_names")
        )
        mapped = {name: to_wsss_schema(source[name], split=name, **kwargs) for name in names}
        if isinstance(split, str):
            return mapped[split]
        iterable = isinstance(source, datasets.IterableDatasetDict)
        return datasets.IterableDatasetDict(mapped) if iterable else datasets.DatasetDict(mapped)
    source = os.fspath(source)
    if source == "synthetic":
        dataset = load_synthetic(split=split, **kwargs)
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if path.is_dir() and find_voc_root(path) is not None:
            dataset = load_voc(path, split=split, **kwargs)
        elif path.is_dir() and is_coco_root(path, kwargs.get("year", 2014)):
            dataset = load_coco(path, split=split, **kwargs)
        else:
            return load_hub_dataset(path, split=split, streaming=streaming, **kwargs)
    elif _looks_local(source):
        raise FileNotFoundError(
            f"{source} does not exist; pass a VOC or COCO folder, a saved dataset, a Hub id, or 'synthetic'."
        )
    else:
        return load_hub_dataset(source, split=split, streaming=streaming, **kwargs)
    return _to_iterable(dataset) if streaming else dataset


__all__ = [
    "IMAGE_IDS_KEY",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_CONFIGURATIONS",
    "BadSampleError",
    "CAMCollator",
    "CAMTrainTransform",
    "EvalTransform",
    "PhotoMetricDistortion",
    "SegmentationCollator",
    "SegmentationTrainTransform",
    "as_dataset_transform",
    "check_class_names",
    "get_class_names",
    "get_coco_category_ids",
    "get_id2label",
    "get_label2id",
    "get_metadata",
    "load_coco",
    "load_hub_dataset",
    "load_synthetic",
    "load_voc",
    "load_wsss_dataset",
    "make_synthetic_split",
    "mask_to_array",
    "render_coco_semantic_mask",
    "to_wsss_schema",
    "trivial_baseline_miou",
    "trivial_baseline_prediction",
    "wsss_features",
]
