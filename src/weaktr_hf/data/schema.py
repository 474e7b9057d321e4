"""The one sample schema every WSSS source is mapped to, where its class names live, and how bad samples are handled.

A sample is `image` (`datasets.Image`), `labels` (the image-level foreground class ids 0..C-1, as a list of
`ClassLabel`), `semantic_mask` (`datasets.Image` or None; 0 = background, k + 1 = foreground class k, 255 = ignore)
and `id` (a string). The foreground class names are the `ClassLabel` names, so they survive `map`, `save_to_disk`,
parquet files and the Hub; source details (e.g. raw COCO category ids) go in `DatasetInfo.description` as JSON.
"""

import hashlib
import io
import json
import logging
import math
import os

import datasets
import numpy as np
import PIL.Image

from ..labels import BACKGROUND, IGNORE_INDEX, foreground_id2label, segmentation_id2label

logger = logging.getLogger(__name__)

METADATA_KEY = "weaktr_hf"
ERROR_COLUMN = "_bad_sample_reason"  # carried through `map` until bad samples are resolved, then removed
ON_BAD_SAMPLE = ("raise", "skip")
# Palette ("P"), grey ("L") and integer ("I", "I;16") PNGs hold class indices; colour modes do not.
INDEX_MASK_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


class BadSampleError(ValueError):
    """A sample that cannot be used as it is (unreadable image, mismatched mask, unknown class...)."""


def check_class_names(class_names, source="the class names"):
    """Foreground class names as a list, or an error naming `source` (e.g. the file they were read from).

    Names must be unique (also ignoring case and surrounding spaces, so that `Cat` and `cat` are not two classes), and
    none may be the background's name: background is label 0 of the masks, not a foreground class.
    """
    class_names = list(class_names)
    if not class_names:
        raise ValueError(f"{source}: a WSSS dataset needs at least one foreground class name.")
    positions = {}
    for position, name in enumerate(class_names):
        positions.setdefault(str(name).strip().casefold(), []).append(position)
    repeated = [places for places in positions.values() if len(places) > 1]
    if repeated:
        where = "; ".join(
            f"{', '.join(repr(class_names[p]) for p in places)} at positions {places}" for places in repeated
        )
        raise ValueError(f"{source}: a class is named more than once ({where}) in {class_names}; name each once.")
    if BACKGROUND in positions:
        raise ValueError(
            f"{source}: {class_names[positions[BACKGROUND][0]]!r} at position {positions[BACKGROUND][0]} is the "
            "background, which is not a foreground class (it is label 0 of the masks and of step 2): leave it out, "
            "and write [] for an image with background only."
        )
    return class_names


def wsss_features(class_names):
    """`datasets.Features` of the WSSS schema for these foreground class names (see `check_class_names`)."""
    class_names = check_class_names(class_names)
    return datasets.Features(
        {
            "image": datasets.Image(),
            "labels": datasets.List(datasets.ClassLabel(names=class_names)),
            "semantic_mask": datasets.Image(),
            "id": datasets.Value("string"),
        }
    )


def features_with_error_column(features):
    """The schema plus the temporary column that records why a sample is bad (None when it is fine)."""
    return datasets.Features({**features, ERROR_COLUMN: datasets.Value("string")})


def metadata_description(class_names, **metadata):
    """A `DatasetInfo.description` string holding the class names and source details as JSON."""
    return json.dumps({METADATA_KEY: {"class_names": list(class_names), **metadata}})


def _first_split(dataset):
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if not dataset:
            raise ValueError("the DatasetDict has no splits.")
        return next(iter(dataset.values()))
    return dataset


def get_metadata(dataset):
    """The source details recorded by the loaders (a dict, empty if the dataset carries none, e.g. from parquet)."""
    info = getattr(_first_split(dataset), "info", None)
    description = getattr(info, "description", None) or ""
    try:
        return dict(json.loads(description).get(METADATA_KEY, {}))
    except (ValueError, AttributeError):
        return {}


def find_class_names(dataset, labels_column="labels"):
    """Foreground class names from the label column's `ClassLabel` feature, else the recorded metadata, else None.

    The column may hold a list of `ClassLabel` (multi-label) or a single `ClassLabel` (one label per image, as in
    image-classification datasets).
    """
    features = _first_split(dataset).features
    labels = None if features is None or not labels_column else features.get(labels_column)
    if not isinstance(labels, datasets.ClassLabel):
        labels = getattr(labels, "feature", None)
    names = getattr(labels, "names", None) or get_metadata(dataset).get("class_names")
    return list(names) if names else None


def get_class_names(dataset):
    """The foreground class names of a WSSS dataset (a `Dataset`, `DatasetDict` or their iterable versions)."""
    names = find_class_names(dataset)
    if names is None:
        raise ValueError(
            "this dataset does not record its class names (its `labels` feature is not a list of ClassLabel); load "
            "it with weaktr_hf.data.load_wsss_dataset(..., class_names=[...])."
        )
    return names


def get_id2label(dataset, with_background=False):
    """`id2label` for a step-1 model (foreground 0..C-1) or, with background, for a step-2 model (0 = background)."""
    names = get_class_names(dataset)
    return segmentation_id2label(names) if with_background else foreground_id2label(names)


def get_label2id(dataset, with_background=False):
    """The inverse of `get_id2label`."""
    return {name: i for i, name in get_id2label(dataset, with_background).items()}


def check_on_bad_sample(on_bad_sample):
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}.")


def resolve_bad_samples(dataset, split, on_bad_sample):
    """Raise on, or drop and log, the samples whose error column is set; then remove that column.

    Raising happens here, in the main process after the (cached, possibly multi-process) `map` that checked every
    sample, so the error names the first bad sample and how many there are.
    """
    reasons = dataset[ERROR_COLUMN]
    bad = [i for i, reason in enumerate(reasons) if reason is not None]
    dataset = dataset.remove_columns(ERROR_COLUMN)
    if not bad:
        return dataset
    if on_bad_sample == "raise":
        more = f" (and {len(bad) - 1} more bad samples)" if len(bad) > 1 else ""
        raise BadSampleError(
            f"split {split!r}: {reasons[bad[0]]}{more}. Fix or remove the file, or pass on_bad_sample='skip' to drop "
            "bad samples with a log line each."
        )
    for i in bad:
        logger.warning("split %r: skipped bad sample: %s", split, reasons[i])
    logger.warning("split %r: skipped %d bad sample(s) of %d.", split, len(bad), len(reasons))
    bad_set = set(bad)
    return dataset.select([i for i in range(len(reasons)) if i not in bad_set])


def open_image(source):
    """A lazily opened PIL image from a path, bytes, or a `datasets.Image` storage dict ({"bytes", "path"})."""
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return PIL.Image.open(io.BytesIO(source))
    if isinstance(source, PIL.Image.Image):
        return source
    return PIL.Image.open(source)


# EXIF orientation tag -> the transpose that shows the stored pixels upright (as PIL.ImageOps.exif_transpose does).
_EXIF_TRANSPOSE = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}


def exif_orientation(image):
    """The EXIF orientation tag of a PIL image (1, i.e. upright, when it has none or an unknown value)."""
    orientation = image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1)
    return orientation if orientation in _EXIF_TRANSPOSE else 1


def stored_size(image):
    """The (width, height) of the stored pixels of a PIL image, before its EXIF orientation is applied."""
    return image.size


def displayed_size(image):
    """The (width, height) of a PIL image as displayed, i.e. as `datasets` decodes it (EXIF orientation applied)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) >= 5 else (width, height)


def to_displayed_frame(array, orientation):
    """A 2-D array (e.g. a mask drawn on the stored pixels) turned the way EXIF `orientation` turns its image."""
    if orientation not in _EXIF_TRANSPOSE:
        return array
    return np.asarray(PIL.Image.fromarray(array).transpose(_EXIF_TRANSPOSE[orientation]))


def check_image(source, name, verify):
    """The (width, height) of an image in the frame every part of the project uses: EXIF orientation applied.

    That is the frame `datasets` decodes images in, so masks are checked against what training, pseudo-labels and
    evaluation see. Decodes all of the image when `verify`, so corrupt or truncated files are caught.
    """
    try:
        image = open_image(source)
        if verify:
            image.load()
        return displayed_size(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadSampleError(f"image {name} cannot be decoded ({error}); re-download or replace it") from error


def check_mask_size(mask, image_source, image_size, mask_name, image_name):
    """Raise unless a mask (PIL) has its image's size, both as displayed (EXIF orientation applied).

    Masks are class maps of the image as displayed (as `datasets`, viewers and annotation tools show it). A mask that
    only fits the stored pixels of a 90-degree-tagged image gets an error that says so.
    """
    size = displayed_size(mask)
    if size == image_size:
        return
    image = open_image(image_source)
    hint = ""
    if size == stored_size(image) and exif_orientation(image) != 1:
        hint = (
            f"; it fits the stored pixels, but the image carries EXIF orientation {exif_orientation(image)} and is "
            "used as displayed (turned): turn the mask to the displayed orientation, or save the image upright "
            "without the tag (PIL.ImageOps.exif_transpose, then save)"
        )
    raise BadSampleError(
        f"{mask_name} is {size[0]}x{size[1]} but {image_name} is {image_size[0]}x{image_size[1]}; masks must have "
        f"the size of their image{hint}"
    )


def mask_to_array(mask, name="mask"):
    """Class indices of a mask image as a uint8/int array: palette PNGs give their indices, never their colours."""
    if isinstance(mask, np.ndarray):
        return mask
    if hasattr(mask, "numpy"):  # a torch tensor
        return mask.numpy()
    if mask.mode not in INDEX_MASK_MODES:
        raise BadSampleError(
            f"mask {name} has mode {mask.mode!r}, i.e. colours, not class indices; save masks as palette ('P') or "
            "grey ('L') PNGs whose pixel values are class indices (0 background, k + 1 class k, 255 ignore)"
        )
    return np.asarray(mask)


def labels_from_mask(mask, num_classes, name="mask"):
    """Sorted foreground class ids (0..C-1) present in a mask; values other than 0..C and 255 are an error."""
    values = np.unique(mask)
    unknown = values[(values != IGNORE_INDEX) & ((values < 0) | (values > num_classes))]
    if unknown.size:
        raise BadSampleError(
            f"mask {name} holds class ids {unknown.tolist()} outside the label map (0 background, 1..{num_classes} "
            f"foreground, {IGNORE_INDEX} ignore); fix the mask or the class names"
        )
    return [int(v) - 1 for v in values if 0 < v <= num_classes]


def as_class_id(value, name):
    """One label value as an int class id; a non-integer (`1.7`, `"x"`) is an error naming the sample, never truncated."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or isinstance(value, (str, bytes, bool, np.bool_)):
        raise BadSampleError(
            f"labels of {name} hold {value!r}, which is not an integer class id; write class ids as whole numbers "
            "0..C-1 or class names"
        )
    return int(number)


def check_labels(labels, num_classes, name):
    """Image-level labels as a sorted list of distinct ints in 0..C-1, or an error naming the sample.

    A single class id (a scalar, as a single-label `ClassLabel` column holds) is a one-element list.
    """
    if np.ndim(labels) == 0:
        labels = [labels]
    try:
        values = sorted({as_class_id(v, name) for v in labels})
    except (TypeError, BadSampleError) as error:
        raise BadSampleError(
            f"labels of {name} are not integer class ids: {labels!r}; expected a class id or a list of class ids"
        ) from error
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise BadSampleError(
            f"labels of {name} hold class ids {bad} outside 0..{num_classes - 1} (foreground classes); fix the labels "
            "or the class names"
        )
    return values


def encode_mask_png(mask):
    """A `datasets.Image` storage dict holding a uint8 array as a PNG (a class-index mask, or an image array)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def file_signature(paths):
    """Hash of the paths, sizes and modification times of files, so a cached split is rebuilt when they change."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"-")
            continue
        try:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except OSError:
            digest.update(f"{path}:missing;".encode())
    return digest.hexdigest()[:16]


def _yield_records(records, signature):
    """Generator behind `datasets.Dataset.from_generator`; `signature` only keys the cache."""
    yield from records


def build_checked_split(
    records,
    raw_features,
    check_function,
    fn_kwargs,
    features,
    description,
    split,
    on_bad_sample,
    num_proc,
    cache_dir,
    signature,
):
    """Write `records` to a cached Arrow file, check/convert every sample with a cached `map`, resolve bad samples.

    `check_function(record, **fn_kwargs)` returns a schema row plus the error column (None when the sample is fine).
    Both steps are cached by `datasets` (keyed by the records, the file signature and the function), so a second load
    of the same folder reads the Arrow files instead of decoding every image again.
    """
    if not records:
        raise ValueError(f"split {split!r} has no samples; check its list of ids.")
    base = datasets.Dataset.from_generator(
        _yield_records,
        features=raw_features,
        cache_dir=cache_dir,
        gen_kwargs={"records": records, "signature": signature},
        split=datasets.NamedSplit(split),
        info=datasets.DatasetInfo(description=description),
    )
    checked = base.map(
        check_function,
        fn_kwargs=fn_kwargs,
        features=features_with_error_column(features),
        remove_columns=base.column_names,
        num_proc=num_proc,
        desc=f"Checking split {split!r}",
    )
    return resolve_bad_samples(checked, split, on_bad_sample)
