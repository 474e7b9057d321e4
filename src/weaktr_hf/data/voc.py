"""PASCAL VOC 2012 (with the SBD `SegmentationClassAug` masks) from a local `VOCdevkit/VOC2012` folder.

Layout read (only `JPEGImages` and the split lists are required)::

    VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png        palette PNGs, read as class indices (0 background, 1..20, 255 ignore)
        SegmentationClassAug/<id>.png     optional, SBD masks (12,031 = train_aug 10,582 + val 1,449)
        Annotations/<id>.xml              optional, object names give image-level labels where no mask exists
        ImageSets/Segmentation/train.txt, val.txt, optional train_aug.txt (or any <split>.txt)

Without `train_aug.txt`, the `train_aug` split is every id with a `SegmentationClassAug` mask that is not in
`val.txt`, which gives the usual 10,582 images.
"""

import logging
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import datasets

from ..labels import VOC_CLASSES
from .schema import (
    ERROR_COLUMN,
    BadSampleError,
    build_checked_split,
    check_image,
    check_mask_size,
    check_on_bad_sample,
    file_signature,
    labels_from_mask,
    mask_to_array,
    metadata_description,
    open_image,
    wsss_features,
)

logger = logging.getLogger(__name__)

VOC_DEFAULT_SPLITS = ("train", "train_aug", "val")
LABEL_SOURCES = ("auto", "mask", "xml")
_RAW_FEATURES = datasets.Features(
    {
        "image_path": datasets.Value("string"),
        "mask_path": datasets.Value("string"),
        "xml_path": datasets.Value("string"),
        "id": datasets.Value("string"),
    }
)


def find_voc_root(path):
    """The `VOC2012` folder (the one holding `JPEGImages`) given it, its `VOCdevkit` parent, or None."""
    path = Path(path)
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_id_list(path):
    """Image ids from a split list: one per line; a line may also be a path such as `/JPEGImages/<id>.jpg ...`.

    Only a folder and an image suffix (`.jpg`, `.jpeg`, `.png`) are taken off, so ids with dots (`scan.001`) stay
    whole.
    """
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = Path(line.split()[0]).name
            ids.append(name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    return ids


def _split_ids(root, split):
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split_file.is_file():
        return read_id_list(split_file)
    aug_dir = root / "SegmentationClassAug"
    val_file = root / "ImageSets" / "Segmentation" / "val.txt"
    if split == "train_aug" and aug_dir.is_dir() and val_file.is_file():
        val_ids = set(read_id_list(val_file))
        return sorted(p.stem for p in aug_dir.glob("*.png") if p.stem not in val_ids)
    hint = (
        " For train_aug, add ImageSets/Segmentation/train_aug.txt or the SBD masks in SegmentationClassAug/ (plus "
        "val.txt, which train_aug excludes)."
        if split == "train_aug"
        else ""
    )
    raise FileNotFoundError(f"split list {split_file} not found; add it (one image id per line).{hint}")


def available_voc_splits(root):
    """The default splits that this folder can provide."""
    available = []
    for split in VOC_DEFAULT_SPLITS:
        try:
            _split_ids(root, split)
        except FileNotFoundError:
            continue
        available.append(split)
    return available


def xml_labels(xml_path, class_names):
    """Foreground class ids of the objects named in a VOC annotation file (all objects, `difficult` included)."""
    try:
        tree = ElementTree.parse(xml_path)
    except ElementTree.ParseError as error:
        raise BadSampleError(f"annotation {xml_path} is not valid XML ({error}); re-download or remove it") from error
    names = [(obj.findtext("name") or "").strip() for obj in tree.getroot().iter("object")]
    unknown = sorted({name for name in names if name not in class_names})
    if unknown:
        raise BadSampleError(
            f"annotation {xml_path} names classes {unknown} outside the label map {list(class_names)}; fix the file "
            "or the class names"
        )
    return sorted({class_names.index(name) for name in names})


def _check_voc_sample(example, class_names, labels_from, verify_images):
    """One raw VOC record -> a schema row, with the reason it is unusable (or None) in the error column."""
    image_path, mask_path, xml_path = example["image_path"], example["mask_path"], example["xml_path"]
    row = {"image": image_path, "semantic_mask": mask_path, "labels": [], "id": example["id"], ERROR_COLUMN: None}
    try:
        image_size = check_image(image_path, image_path, verify_images)
        mask_labels = None
        if mask_path is not None:
            check_image(mask_path, mask_path, verify=True)
            mask_image = open_image(mask_path)
            check_mask_size(mask_image, image_path, image_size, f"mask {mask_path}", f"image {image_path}")
            mask_labels = labels_from_mask(mask_to_array(mask_image, mask_path), len(class_names), mask_path)
        if labels_from == "mask" or (labels_from == "auto" and mask_labels is not None):
            if mask_labels is None:
                raise BadSampleError(
                    f"id {example['id']} has no mask in SegmentationClass/ or SegmentationClassAug/ but labels_from="
                    "'mask'; add the mask or use labels_from='auto'"
                )
            row["labels"] = mask_labels
        elif xml_path is not None:
            row["labels"] = xml_labels(xml_path, class_names)
        else:
            raise BadSampleError(
                f"id {example['id']} has no mask and no Annotations/{example['id']}.xml, so its image-level labels "
                "are unknown; add one of them"
            )
    except BadSampleError as error:
        row["labels"] = []
        row[ERROR_COLUMN] = str(error)
    return row


def load_voc(
    root,
    split=None,
    labels_from="auto",
    verify_images=True,
    on_bad_sample="raise",
    num_proc=None,
    cache_dir=None,
):
    """Load PASCAL VOC 2012 from a local folder into the WSSS schema.

    Args:
        root: the `VOC2012` folder, or a `VOCdevkit` folder (or its parent) holding one.
        split: a split name (`train`, `train_aug`, `val`, or any `ImageSets/Segmentation/<split>.txt`), a list of
            them, or None for every default split the folder provides.
        labels_from: `"auto"` (mask class ids where a mask exists, else the XML objects), `"mask"` or `"xml"`.
        verify_images: decode every image once (cached) so corrupt or truncated files are caught at load time.
        on_bad_sample: `"raise"` or `"skip"` (drop each bad sample with a log line, then log the count).
        num_proc: processes for the checking pass.
        cache_dir: where `datasets` caches the Arrow files (default: the `datasets` cache).

    Returns:
        A `datasets.Dataset` for one split name, else a `datasets.DatasetDict`.

    Images are used as displayed (EXIF orientation applied, as `datasets` decodes them), so masks must be drawn on
    the displayed image; a mask that only fits the stored pixels of a 90-degree-tagged image is a bad sample (a
    mask of the stored pixels of a 180-degree or mirrored image cannot be told apart: strip such tags first).
    """
    check_on_bad_sample(on_bad_sample)
    if labels_from not in LABEL_SOURCES:
        raise ValueError(f"labels_from must be one of {LABEL_SOURCES}, got {labels_from!r}.")
    voc_root = find_voc_root(root)
    if voc_root is None:
        raise FileNotFoundError(
            f"{root} is not a VOC 2012 folder: expected JPEGImages/ in it, in {root}/VOC2012 or in "
            f"{root}/VOCdevkit/VOC2012 (see weaktr_hf.data.voc for the layout)."
        )
    voc_root = voc_root.resolve()
    splits = available_voc_splits(voc_root) if split is None else ([split] if isinstance(split, str) else split)
    if not splits:
        raise FileNotFoundError(
            f"no split lists found in {voc_root / 'ImageSets' / 'Segmentation'}; add train.txt / val.txt."
        )
    features = wsss_features(VOC_CLASSES)
    description = metadata_description(VOC_CLASSES, source="voc2012", root=str(voc_root))
    fn_kwargs = {"class_names": list(VOC_CLASSES), "labels_from": labels_from, "verify_images": verify_images}
    result = datasets.DatasetDict()
    for name in splits:
        ids = _split_ids(voc_root, name)
        mask_dirs = ("SegmentationClassAug", "SegmentationClass")
        if name != "train_aug":
            mask_dirs = mask_dirs[::-1]  # the official VOC masks (with 255 boundaries) first
        records = []
        for image_id in ids:
            mask_path = next(
                (str(p) for d in mask_dirs if (p := voc_root / d / f"{image_id}.png").is_file()),
                None,
            )
            xml_path = voc_root / "Annotations" / f"{image_id}.xml"
            records.append(
                {
                    "image_path": str(voc_root / "JPEGImages" / f"{image_id}.jpg"),
                    "mask_path": mask_path,
                    "xml_path": str(xml_path) if xml_path.is_file() else None,
                    "id": image_id,
                }
            )
        paths = [p for r in records for p in (r["image_path"], r["mask_path"], r["xml_path"])]
        result[name] = build_checked_split(
            records,
            _RAW_FEATURES,
            _check_voc_sample,
            fn_kwargs,
            features,
            description,
            name,
            on_bad_sample,
            num_proc,
            cache_dir,
            file_signature(paths),
        )
        logger.info("VOC split %r: %d images from %s", name, len(result[name]), voc_root)
    return result[split] if isinstance(split, str) else result
