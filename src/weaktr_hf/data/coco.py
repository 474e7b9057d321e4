"""MS COCO 2014 from a local folder, with semantic masks rendered once from the instance annotations.

Layout read::

    <root>/
        train2014/*.jpg, val2014/*.jpg
        annotations/instances_train2014.json, annotations/instances_val2014.json

Image-level labels are the categories of all of an image's annotations (crowd ones included: the class is in the
picture). Masks are rendered with pycocotools from polygons and RLE: instances are painted largest first, so a small
object in front of a large one stays visible; crowd regions become 255 (ignore) wherever no single instance was
painted. Category ids become contiguous labels 0..79 (mask values 1..80) in the order of the raw ids, and the raw ids
are recorded (`get_coco_category_ids`); `id_layout="raw"` instead keeps the authors' raw layout (labels = raw id - 1,
mask values = raw id, 90 classes). Ids are the 12-digit image ids, as in the authors' COCO lists.
"""

import json
import logging
import warnings
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np

from ..labels import COCO_RAW_ID_TO_NAME
from .schema import (
    ERROR_COLUMN,
    BadSampleError,
    build_checked_split,
    check_image,
    check_on_bad_sample,
    encode_mask_png,
    exif_orientation,
    file_signature,
    get_class_names,
    get_metadata,
    metadata_description,
    open_image,
    stored_size,
    to_displayed_frame,
    wsss_features,
)

logger = logging.getLogger(__name__)

COCO_DEFAULT_SPLITS = ("train", "val")
ID_LAYOUTS = ("contiguous", "raw")
_RAW_FEATURES = datasets.Features(
    {
        "image_path": datasets.Value("string"),
        "height": datasets.Value("int64"),
        "width": datasets.Value("int64"),
        "annotations": datasets.Value("string"),  # JSON list of the image's annotations
        "id": datasets.Value("string"),
    }
)


def coco_annotation_file(root, split, year=2014):
    return Path(root) / "annotations" / f"instances_{split}{year}.json"


def is_coco_root(path, year=2014):
    return any(coco_annotation_file(path, split, year).is_file() for split in COCO_DEFAULT_SPLITS)


def coco_class_layout(categories, id_layout):
    """Class names and the raw category id of each label 0..C-1 for the json's categories."""
    if id_layout not in ID_LAYOUTS:
        raise ValueError(f"id_layout must be one of {ID_LAYOUTS}, got {id_layout!r}.")
    categories = sorted(categories, key=lambda c: c["id"])
    if not categories:
        raise ValueError("the annotation file lists no categories.")
    if id_layout == "contiguous":
        return [c["name"] for c in categories], [c["id"] for c in categories]
    beyond = [c["id"] for c in categories if c["id"] not in COCO_RAW_ID_TO_NAME]
    if beyond:
        raise ValueError(f"category ids {beyond} are outside COCO's raw ids 1..90; use id_layout='contiguous'.")
    raw_ids = sorted(COCO_RAW_ID_TO_NAME)
    return [COCO_RAW_ID_TO_NAME[i] for i in raw_ids], raw_ids


def get_coco_category_ids(dataset):
    """The raw COCO category id of each foreground label 0..C-1 (from the recorded metadata, else by class name)."""
    recorded = get_metadata(dataset).get("coco_category_ids")
    if recorded:
        return list(recorded)
    name_to_raw_id = {name: raw_id for raw_id, name in COCO_RAW_ID_TO_NAME.items()}
    names = get_class_names(dataset)
    missing = [name for name in names if name not in name_to_raw_id]
    if missing:
        raise ValueError(f"classes {missing} are not COCO category names; this is not a COCO dataset.")
    return [name_to_raw_id[name] for name in names]


def _annotation_mask(annotation, height, width):
    """Boolean (height, width) mask of one annotation (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    segmentation = annotation.get("segmentation")
    where = f"annotation {annotation.get('id')}"
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points covers no area
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            if list(segmentation.get("size", [])) != [height, width]:
                raise BadSampleError(
                    f"{where}: RLE size {segmentation.get('size')} differs from the image size {[height, width]}"
                )
            if isinstance(segmentation["counts"], list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                counts = segmentation["counts"]
                rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise BadSampleError(f"{where}: segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")
        with warnings.catch_warnings():  # pycocotools' Cython decoder predates numpy 2's __array__(copy=) protocol
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except BadSampleError:
        raise
    except Exception as error:  # pycocotools raises TypeError/ValueError on malformed input
        raise BadSampleError(f"{where}: cannot decode its segmentation ({error})") from error


def render_coco_semantic_mask(annotations, height, width, category_to_label):
    """Semantic mask (uint8: 0 background, label + 1, 255 crowd) and sorted image-level labels of one image."""
    labels = set()
    instances, crowd = [], np.zeros((height, width), dtype=bool)
    for annotation in annotations:
        category = annotation.get("category_id")
        if category not in category_to_label:
            raise BadSampleError(
                f"annotation {annotation.get('id')} has category_id {category}, which the file's categories do not "
                "list; fix the annotation file"
            )
        labels.add(category_to_label[category])
        region = _annotation_mask(annotation, height, width)
        if annotation.get("iscrowd", 0):
            crowd |= region
        else:
            instances.append((region, category_to_label[category]))
    mask = np.zeros((height, width), dtype=np.uint8)
    # Largest first (stable for ties), so smaller objects drawn later stay visible.
    for region, label in sorted(instances, key=lambda item: -int(item[0].sum())):
        mask[region] = label + 1
    mask[crowd & (mask == 0)] = 255
    return mask, sorted(labels)


def _render_coco_sample(example, category_to_label, verify_images):
    """One raw COCO record -> a schema row with its rendered mask, or the reason it is unusable."""
    image_path, height, width = example["image_path"], example["height"], example["width"]
    row = {"image": image_path, "semantic_mask": None, "labels": [], "id": example["id"], ERROR_COLUMN: None}
    try:
        size = check_image(image_path, image_path, verify_images)
        image = open_image(image_path)
        orientation = exif_orientation(image)
        # Annotations are in the frame the file's width/height describe: the stored pixels (COCO's own convention,
        # and the only one possible when both frames have the same size), or the displayed frame (tools that apply
        # EXIF). The mask is rendered there and turned into the displayed frame, which `datasets` decodes images in.
        if (width, height) == stored_size(image):
            frame_orientation = orientation
        elif (width, height) == size:
            frame_orientation = 1
        else:
            stored_width, stored_height = stored_size(image)
            stored = "" if (stored_width, stored_height) == size else f" (stored as {stored_width}x{stored_height})"
            raise BadSampleError(
                f"image {image_path} is {size[0]}x{size[1]}{stored} but its annotation file says {width}x{height}; "
                "replace the image or fix the file"
            )
        # json turns int keys into strings, and fn_kwargs travel through the cache fingerprint as given
        mapping = {int(k): v for k, v in category_to_label.items()}
        mask, labels = render_coco_semantic_mask(json.loads(example["annotations"]), height, width, mapping)
        row["semantic_mask"] = encode_mask_png(to_displayed_frame(mask, frame_orientation))
        row["labels"] = labels
    except BadSampleError as error:
        row[ERROR_COLUMN] = f"id {example['id']}: {error}"
    return row


def load_coco(
    root,
    split=None,
    year=2014,
    id_layout="contiguous",
    keep_unannotated=False,
    verify_images=True,
    on_bad_sample="raise",
    num_proc=None,
    cache_dir=None,
):
    """Load MS COCO from a local folder into the WSSS schema, rendering the masks once (cached, `num_proc` allowed).

    Args:
        root: the folder holding `annotations/` and the `<split><year>/` image folders.
        split: `train`, `val`, a list of them, or None for those whose annotation file exists.
        year: 2014 (the WeakTr setting) or 2017.
        id_layout: `"contiguous"` (labels 0..C-1 in raw-id order) or `"raw"` (labels = raw id - 1, 90 classes).
        keep_unannotated: keep images without any annotation (empty labels, all-background mask); by default they
            are dropped and their count is logged.

    Images are used as displayed (EXIF orientation applied, as `datasets` decodes them). Annotations are taken in the
    frame the file's `width`/`height` describe: the stored pixels (COCO's convention, and the choice when both frames
    have the same size), or the displayed image when only that fits; the mask is turned like the image.
        verify_images / on_bad_sample / num_proc / cache_dir: as in `load_voc`.

    Returns:
        A `datasets.Dataset` for one split name, else a `datasets.DatasetDict`.
    """
    check_on_bad_sample(on_bad_sample)
    root = Path(root).resolve()
    if split is None:
        splits = [s for s in COCO_DEFAULT_SPLITS if coco_annotation_file(root, s, year).is_file()]
        if not splits:
            raise FileNotFoundError(
                f"no instances_train{year}.json or instances_val{year}.json in {root / 'annotations'}; see "
                "weaktr_hf.data.coco for the layout."
            )
    else:
        splits = [split] if isinstance(split, str) else list(split)
    result = datasets.DatasetDict()
    class_names = None
    for name in splits:
        annotation_file = coco_annotation_file(root, name, year)
        image_dir = root / f"{name}{year}"
        if not annotation_file.is_file():
            raise FileNotFoundError(f"annotation file {annotation_file} not found; download it for split {name!r}.")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder {image_dir} not found; unpack {name}{year}.zip there.")
        with open(annotation_file) as handle:
            coco = json.load(handle)
        missing = [key for key in ("images", "annotations", "categories") if key not in coco]
        if missing:
            raise ValueError(f"{annotation_file} lacks {missing}; it is not a COCO instances file.")
        split_names, category_ids = coco_class_layout(coco["categories"], id_layout)
        if class_names is not None and split_names != class_names:
            raise ValueError(f"{annotation_file} lists other categories than the previous split; use matching files.")
        class_names = split_names
        if id_layout == "contiguous":
            category_to_label = {raw_id: label for label, raw_id in enumerate(category_ids)}
        else:
            category_to_label = {c["id"]: c["id"] - 1 for c in coco["categories"]}

        by_image = defaultdict(list)
        for annotation in coco["annotations"]:
            keep = ("id", "category_id", "iscrowd", "segmentation")
            by_image[annotation["image_id"]].append({k: annotation[k] for k in keep if k in annotation})
        known_ids = {image["id"] for image in coco["images"]}
        orphans = [a[0]["id"] for image_id, a in by_image.items() if image_id not in known_ids]
        if orphans:
            raise ValueError(f"{annotation_file}: annotations {orphans[:5]} refer to images the file does not list.")
        records, unannotated = [], 0
        for image in sorted(coco["images"], key=lambda im: im["id"]):
            annotations = by_image.get(image["id"], [])
            if not annotations and not keep_unannotated:
                unannotated += 1
                continue
            records.append(
                {
                    "image_path": str(image_dir / image["file_name"]),
                    "height": image["height"],
                    "width": image["width"],
                    "annotations": json.dumps(annotations),
                    "id": f"{image['id']:012d}",
                }
            )
        if unannotated:
            logger.warning(
                "COCO split %r: left out %d image(s) without any annotation (keep_unannotated=True keeps them).",
                name,
                unannotated,
            )
        description = metadata_description(
            class_names, source=f"coco{year}", root=str(root), id_layout=id_layout, coco_category_ids=category_ids
        )
        result[name] = build_checked_split(
            records,
            _RAW_FEATURES,
            _render_coco_sample,
            {"category_to_label": {str(k): v for k, v in category_to_label.items()}, "verify_images": verify_images},
            wsss_features(class_names),
            description,
            name,
            on_bad_sample,
            num_proc,
            None if cache_dir is None else str(cache_dir),
            file_signature([str(annotation_file)] + [r["image_path"] for r in records]),
        )
        logger.info("COCO split %r: %d images from %s", name, len(result[name]), root)
    return result[split] if isinstance(split, str) else result
