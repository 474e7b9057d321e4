"""The pseudo-label writer between WeakTr's two steps (paper Sec. 3.1; hustvl/WeakTr `engine.py`
`generate_attention_maps_ms` for the CAMs, `evaluation.py` for the thresholded label maps).

`write_pseudo_labels` turns a step-1 model's multi-scale CAMs into one palette PNG per image (thresholded, optionally
refined by the dense CRF), resumable and sharded across processes; `pseudo_label_dataset` hands those PNGs to the
step-2 training as the dataset's `semantic_mask`; `evaluate_pseudo_labels` scores them against ground-truth masks.
Datasets follow the project schema (`weaktr_hf.data.schema`): `image`, `labels` (foreground ids), `id`,
`semantic_mask` (0 = background, k + 1 = class k, 255 = ignore).
"""

import hashlib
import inspect
import json
import os
import uuid
from typing import NamedTuple

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.schema import mask_to_array
from .image_processing_weaktr import WeakTrImageProcessor, pil_image_to_uint8
from .inference import cams_to_labels, generate_cams
from .labels import IGNORE_INDEX
from .metrics import ConfusionMatrix
from .visualization import load_label_png, save_label_png


class PseudoLabelSummary(NamedTuple):
    """What one `write_pseudo_labels` call did with its shard: ids written now and ids already done before."""

    written: list
    skipped: list


def _check_ids(dataset):
    """The dataset's `id` column as a list of strings, unique, or an error naming the problem."""
    if "id" not in dataset.column_names:
        raise ValueError(
            f"the dataset has no 'id' column (columns: {dataset.column_names}); pseudo-label files are named by it. "
            "Load the data with weaktr_hf.data so it follows the project schema."
        )
    ids = [str(sample_id) for sample_id in dataset["id"]]
    seen, duplicates = set(), []
    for sample_id in ids:
        if sample_id in seen:
            duplicates.append(sample_id)
        seen.add(sample_id)
    if duplicates:
        raise ValueError(
            f"sample ids must be unique to name one pseudo-label file each; repeated: {sorted(set(duplicates))[:10]}."
        )
    return ids


def pseudo_label_path(pseudo_label_dir, sample_id):
    """Where the pseudo-label PNG of one sample lives."""
    return os.path.join(os.fspath(pseudo_label_dir), f"{sample_id}.png")


def _default_image_transform():
    """ImageNet-normalised (3, H, W) tensor of a PIL image at its native size, via `WeakTrImageProcessor`."""
    processor = WeakTrImageProcessor(do_resize=False, do_pad=False)
    return lambda image: processor(image, return_tensors="pt").pixel_values[0]


def _check_crf(crf):
    """The CRF settings as a dict, checked before any image is processed: known keywords, pydensecrf installed."""
    from .crf import _import_densecrf, crf_refine_labels

    if not hasattr(crf, "keys"):
        raise ValueError(
            "crf must be None or a dict of crf_refine_labels keyword arguments (e.g. "
            f"weaktr_hf.crf.VOC_PSEUDO_LABEL_CRF), got {type(crf).__name__}."
        )
    crf = dict(crf)
    allowed = set(inspect.signature(crf_refine_labels).parameters) - {"image_uint8_hwc", "label_map", "num_labels"}
    unknown = sorted(set(crf) - allowed)
    if unknown:
        raise ValueError(f"unknown CRF setting(s) {unknown}; crf_refine_labels accepts {sorted(allowed)}.")
    _import_densecrf()  # a clear ImportError with the install command now rather than after the first image
    return crf


def _refine_with_crf(image, label_map, present_ids, crf):
    """Dense-CRF refinement over the classes in play only (background + present classes), mapped back to dataset ids.

    The CRF's unary depends on its number of labels, so, as the authors do, the map is first renumbered to
    0 = background, j = j-th present class.
    """
    from .crf import crf_refine_labels

    label_ids = np.array([0] + [class_id + 1 for class_id in present_ids], dtype=np.int64)
    # `label_map` only holds background and present classes (absent classes never win the argmax).
    to_compact = np.zeros(label_ids[-1] + 1, dtype=np.int64)
    to_compact[label_ids] = np.arange(len(label_ids))
    refined = crf_refine_labels(image, to_compact[label_map], len(label_ids), **crf)
    return label_ids[refined]


SETTINGS_FILE = "pseudo_label_settings.json"
# PNG text chunk holding the image-level labels a pseudo-label was made from (they pick the classes it may hold).
IMAGE_LABELS_KEY = "weaktr_image_labels"


def _image_labels_text(labels):
    """A sample's image-level labels as the text recorded in its pseudo-label PNG (sorted distinct ids, JSON)."""
    return json.dumps(sorted({int(class_id) for class_id in labels}))


def _recorded_image_labels(path):
    """The image-level labels text recorded in a pseudo-label PNG; None when the file or the record is missing."""
    if not os.path.isfile(path):
        return None
    with Image.open(path) as png:
        return png.info.get(IMAGE_LABELS_KEY)


def _model_fingerprint(model):
    """SHA-256 of the model's weights (names, shapes and values), so labels of another model are not mistaken for
    this one's."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pseudo_label_settings(model, image_transform, scales, flip, threshold, crf, cam):
    """Everything a pseudo-label PNG depends on besides its image and image-level labels (recorded in the PNG itself),
    as JSON values (compared after a JSON round trip)."""
    settings = {
        "model_weights_sha256": _model_fingerprint(model),
        "cam": cam,
        "scales": [float(scale) for scale in scales],
        "flip": bool(flip),
        "threshold": float(threshold),
        "crf": crf,
        "image_transform": getattr(image_transform, "__qualname__", type(image_transform).__qualname__),
    }
    return json.loads(json.dumps(settings, sort_keys=True))


def _settings_differences(folder, settings):
    """None when `folder` has no record; else the recorded settings that differ from `settings`, in words ('' if
    none)."""
    path = os.path.join(os.fspath(folder), SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        recorded = json.load(file)
    changed = sorted(key for key in set(recorded) | set(settings) if recorded.get(key) != settings.get(key))
    return "; ".join(f"{key}: {recorded.get(key)!r} -> {settings.get(key)!r}" for key in changed)


def stale_pseudo_labels(folder, model, *, scales=(1.0,), flip=False, threshold, crf=None, cam="fine_cam",
                        image_transform=None, crf_applied=True):  # fmt: skip
    """Why the PNGs in `folder` cannot be resumed with these settings (made with others, or without a record), or
    None when they can (or the folder holds none). `write_pseudo_labels` refuses such a folder; a caller that means
    to redo the labels (the recipe's pseudo stage, rerun with new settings) removes it first."""
    if not os.path.isdir(folder) or not any(name.endswith(".png") for name in os.listdir(folder)):
        return None
    image_transform = image_transform if image_transform is not None else _default_image_transform()
    settings = _pseudo_label_settings(model, image_transform, scales, flip, threshold, _check_crf(crf) if crf else None,
                                      cam)  # fmt: skip
    if not crf_applied:
        settings = {**settings, "crf": None}
    differences = _settings_differences(folder, settings)
    if differences is None:
        return f"no record ({SETTINGS_FILE}) of the settings its PNGs were made with"
    return f"made with other settings ({differences})" if differences else None


def _check_or_record_settings(folder, settings, ids):
    """Record the settings with a new folder; refuse a folder whose PNGs were made with other settings.

    Each process writes the same record atomically, so sharded processes can all call this.
    """
    path = os.path.join(os.fspath(folder), SETTINGS_FILE)
    differences = _settings_differences(folder, settings)
    if differences is not None:
        if differences:
            raise ValueError(
                f"the pseudo-labels in {os.fspath(folder)!r} were made with other settings ({differences}), so "
                "resuming would mix them. Write to another folder, or delete this one to make them again."
            )
        return
    if any(os.path.exists(pseudo_label_path(folder, sample_id)) for sample_id in ids):
        raise ValueError(
            f"{os.fspath(folder)!r} holds pseudo-label PNGs but no record ({SETTINGS_FILE}) of the settings they were "
            "made with, so they may be stale. Write to another folder, or delete this one to make them again."
        )
    temporary = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2, sort_keys=True)
    os.replace(temporary, path)


def write_pseudo_labels(
    model,
    dataset,
    output_dir,
    image_transform=None,
    scales=(1.0, 1.2),
    flip=True,
    threshold=0.43,
    crf=None,
    process_index=0,
    num_processes=1,
    cam="fine_cam",
    show_progress=True,
    uncrf_output_dir=None,
):
    """
    Write `output_dir/<id>.png` for every sample of this process's shard: the pseudo-label map of WeakTr
    (multi-scale + flip CAMs from `generate_cams`, background threshold, optional dense CRF) as a palette PNG with
    0 = background and k + 1 = foreground class k.

    Resumable: a sample whose PNG exists is skipped (PNGs are written atomically, so an existing file is complete),
    unless its image-level labels changed since: each PNG records the labels it was made from, and a PNG made from
    other labels (or without that record) is made again.
    The settings (model weights' hash, CAM, scales, flip, threshold, CRF, image transform) are recorded in
    `output_dir/pseudo_label_settings.json`; resuming in a folder made with other settings, or holding PNGs without
    that record, is an error rather than a silent mix of old and new labels.
    Sharded: process `process_index` of `num_processes` handles the samples with `index % num_processes ==
    process_index`, so the shards of all processes cover each sample exactly once.

    Args:
        model: a `WeakTrForCAM` whose classes are the dataset's foreground classes.
        dataset: a `datasets.Dataset` with `image`, `labels` (foreground class ids) and `id` columns.
        output_dir: folder of the PNGs (created if needed).
        image_transform: callable PIL image -> normalised (3, H, W) tensor at the image's native size; defaults to
            `WeakTrImageProcessor(do_resize=False)` (ImageNet normalisation).
        scales, flip, cam: passed to `generate_cams`.
        threshold (`float`): background score (0.43 VOC, 0.42 COCO).
        crf (`dict`, *optional*): keyword arguments of `weaktr_hf.crf.crf_refine_labels` (e.g.
            `weaktr_hf.crf.VOC_PSEUDO_LABEL_CRF`); `None` skips the CRF.
        process_index, num_processes (`int`): this process's shard (e.g. `accelerator.process_index`,
            `accelerator.num_processes`).
        show_progress (`bool`): show a tqdm bar (pass `accelerator.is_main_process`).
        uncrf_output_dir (*optional*): with `crf`, also write the maps before the CRF there, from the same CAMs (so
            both can be scored without computing the CAMs twice). A sample counts as done when every requested
            PNG exists.

    Returns:
        `PseudoLabelSummary` with the ids written by this call and the ids of its shard that were already done.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}.")
    if not isinstance(process_index, int) or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be an integer in [0, {num_processes}), got {process_index!r}.")
    if crf is not None:
        crf = _check_crf(crf)
    elif uncrf_output_dir is not None:
        raise ValueError("uncrf_output_dir holds the maps before the CRF, so it needs crf=...; drop it or pass crf.")
    num_classes = model.config.num_labels
    if num_classes >= IGNORE_INDEX:
        raise ValueError(
            f"the model has {num_classes} foreground classes, but pseudo-label PNGs are 8-bit with k + 1 for class k "
            f"and {IGNORE_INDEX} = ignore, so at most {IGNORE_INDEX - 1} foreground classes fit."
        )
    missing_columns = [name for name in ("image", "labels") if name not in dataset.column_names]
    if missing_columns:
        raise ValueError(
            f"the dataset lacks the column(s) {missing_columns} (columns: {dataset.column_names}); CAM generation "
            "needs each sample's image and image-level labels."
        )
    ids = _check_ids(dataset)
    output_dirs = [output_dir] + ([uncrf_output_dir] if crf is not None and uncrf_output_dir is not None else [])
    for folder in output_dirs:
        os.makedirs(folder, exist_ok=True)
    image_transform = image_transform if image_transform is not None else _default_image_transform()
    settings = _pseudo_label_settings(model, image_transform, scales, flip, threshold, crf, cam)
    _check_or_record_settings(output_dir, settings, ids)
    if len(output_dirs) > 1:
        _check_or_record_settings(uncrf_output_dir, {**settings, "crf": None}, ids)

    shard = range(process_index, len(ids), num_processes)
    # A PNG is done only if it was made from the sample's current image-level labels (a relabelled image, or a PNG
    # without the record, is made again).
    labels_text = {i: _image_labels_text(labels) for i, labels in zip(shard, dataset.select(shard)["labels"])}
    skipped = [
        ids[i]
        for i in shard
        if all(_recorded_image_labels(pseudo_label_path(folder, ids[i])) == labels_text[i] for folder in output_dirs)
    ]
    done = set(skipped)
    pending = [i for i in shard if ids[i] not in done]
    samples = dataset.select_columns(["image", "labels"])  # leave other columns (e.g. masks) undecoded
    written = []
    progress = tqdm(pending, desc="pseudo-labels", disable=not show_progress, dynamic_ncols=True)
    for index in progress:
        sample = samples[index]
        sample_id = ids[index]
        image = sample["image"]
        present_ids = sorted({int(class_id) for class_id in sample["labels"]})
        bad = [class_id for class_id in present_ids if not 0 <= class_id < num_classes]
        if bad:
            raise ValueError(
                f"sample {sample_id!r} has class ids {bad} outside the model's {num_classes} foreground classes; "
                "the model's id2label must match the dataset's class names."
            )
        pixel_values = image_transform(image)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 3:
            raise ValueError(
                f"image_transform must return a (3, height, width) tensor, got "
                f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)} for sample {sample_id!r}."
            )
        if tuple(pixel_values.shape[-2:]) != (image.height, image.width):
            raise ValueError(
                f"image_transform changed the size of sample {sample_id!r} from {(image.height, image.width)} to "
                f"{tuple(pixel_values.shape[-2:])}; pseudo-labels must be at the image's native size, so the "
                "transform must only normalise (generate_cams resizes per scale itself)."
            )
        labels = [present_ids]
        cams = generate_cams(model, pixel_values[None], labels, scales=scales, flip=flip, cam=cam)
        label_map = cams_to_labels(cams, labels, threshold)[0].cpu().numpy()
        text = {IMAGE_LABELS_KEY: labels_text[index]}
        if len(output_dirs) > 1:
            save_label_png(pseudo_label_path(uncrf_output_dir, sample_id), label_map, text=text)
        if crf is not None and present_ids:
            label_map = _refine_with_crf(pil_image_to_uint8(image), label_map, present_ids, crf)
        # Written last: its presence marks the sample as done.
        save_label_png(pseudo_label_path(output_dir, sample_id), label_map, text=text)
        written.append(sample_id)
    return PseudoLabelSummary(written=written, skipped=skipped)


def _label_paths(ids, pseudo_label_dir):
    """The PNG path of every id, or an error listing the ids that have none yet."""
    paths = [os.path.abspath(pseudo_label_path(pseudo_label_dir, sample_id)) for sample_id in ids]
    missing = [sample_id for sample_id, path in zip(ids, paths) if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(repr(sample_id) for sample_id in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} samples have no pseudo-label PNG in {os.fspath(pseudo_label_dir)!r}: "
            f"{shown}{more}. Run write_pseudo_labels (the training script's --stage pseudo) to finish them."
        )
    return paths


def pseudo_label_dataset(dataset, pseudo_label_dir):
    """
    The dataset with its `semantic_mask` column replaced by the pseudo-label PNGs of `pseudo_label_dir`
    (`datasets.Image`, loaded lazily), for training step 2. Raises `FileNotFoundError` listing the ids without a PNG.
    """
    ids = _check_ids(dataset)
    paths = _label_paths(ids, pseudo_label_dir)
    columns = list(dataset.column_names)
    if "semantic_mask" in columns:
        dataset = dataset.remove_columns("semantic_mask")
    else:
        columns.append("semantic_mask")
    # `add_column` stores values as given: an image column's storage is {"bytes", "path"}, decoded lazily.
    storage = [{"bytes": None, "path": path} for path in paths]
    dataset = dataset.add_column("semantic_mask", storage, feature=datasets.Image())
    return dataset.select_columns(columns)


def evaluate_pseudo_labels(dataset, pseudo_label_dir, num_labels, show_progress=False):
    """
    Score the pseudo-label PNGs against the dataset's ground-truth `semantic_mask` (255 ignored) with the project's
    confusion-matrix mIoU.

    Args:
        num_labels (`int`): classes including background (e.g. 21 for VOC).

    Returns:
        The dict of `weaktr_hf.metrics.ConfusionMatrix.compute`: `mean_iou`, `per_category_iou`, `overall_accuracy`...
    """
    if "semantic_mask" not in dataset.column_names:
        raise ValueError(
            "the dataset has no 'semantic_mask' column; evaluating pseudo-labels needs ground-truth masks."
        )
    ids = _check_ids(dataset)
    paths = _label_paths(ids, pseudo_label_dir)
    masks = dataset.select_columns(["semantic_mask"])
    accumulator = ConfusionMatrix(num_labels)
    for index in tqdm(range(len(ids)), desc="pseudo-label mIoU", disable=not show_progress, dynamic_ncols=True):
        mask = masks[index]["semantic_mask"]
        if mask is None:
            raise ValueError(
                f"sample {ids[index]!r} has no ground-truth semantic_mask; evaluate on a split with masks "
                "(e.g. VOC's segmentation train set)."
            )
        accumulator.update(load_label_png(paths[index]), mask_to_array(mask, name=repr(ids[index])))
    return accumulator.compute()


__all__ = [
    "PseudoLabelSummary",
    "evaluate_pseudo_labels",
    "pseudo_label_dataset",
    "pseudo_label_path",
    "write_pseudo_labels",
]
