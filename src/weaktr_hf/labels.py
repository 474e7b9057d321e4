"""Class names and id layouts of the datasets WeakTr is trained on.

Step 1 (`WeakTrForCAM`) has one class token per *foreground* class; step 2
(`WeakTrForSemanticSegmentation`) predicts background as label 0 plus the foreground classes. Masks use 255 for
"ignore".
"""

BACKGROUND = "background"
IGNORE_INDEX = 255

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# COCO 2014 category names by their raw category id (1..90). Ids that no annotation uses keep the name the COCO
# paper gave them, so that the authors' raw-id checkpoints (90 class tokens, 91 labels with background) can be
# described without gaps.
COCO_RAW_ID_TO_NAME = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 12: "street sign", 13: "stop sign", 14: "parking meter",
    15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 26: "hat", 27: "backpack", 28: "umbrella", 29: "shoe", 30: "eye glasses",
    31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
    38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket",
    44: "bottle", 45: "plate", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
    59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 66: "mirror",
    67: "dining table", 68: "window", 69: "desk", 70: "toilet", 71: "door", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 83: "blender", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}  # fmt: skip
COCO_UNUSED_RAW_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_USED_RAW_IDS = tuple(i for i in sorted(COCO_RAW_ID_TO_NAME) if i not in COCO_UNUSED_RAW_IDS)
COCO_CLASSES = tuple(COCO_RAW_ID_TO_NAME[i] for i in COCO_USED_RAW_IDS)  # the 80 used classes, contiguous order


def foreground_id2label(names):
    """`id2label` for a step-1 model: one entry per foreground class, starting at 0."""
    return {i: name for i, name in enumerate(names)}


def segmentation_id2label(names):
    """`id2label` for a step-2 model: background is 0, foreground classes follow from 1."""
    return {0: BACKGROUND, **{i + 1: name for i, name in enumerate(names)}}


def coco_raw_id2label(with_background):
    """The authors' raw COCO id layout: ids 1..90 (90 class tokens), plus background 0 for step 2.

    Step 1 shifts every raw id down by one (class token i is raw id i + 1), as the authors' one-hot label vectors do.
    """
    if with_background:
        return {0: BACKGROUND, **dict(COCO_RAW_ID_TO_NAME)}
    return {raw_id - 1: name for raw_id, name in COCO_RAW_ID_TO_NAME.items()}


def label_layouts():
    """Every named layout, keyed by (dataset, with_background), for conversion and data loaders."""
    return {
        ("voc12", False): foreground_id2label(VOC_CLASSES),
        ("voc12", True): segmentation_id2label(VOC_CLASSES),
        ("coco14", False): foreground_id2label(COCO_CLASSES),
        ("coco14", True): segmentation_id2label(COCO_CLASSES),
        ("coco14-raw", False): coco_raw_id2label(with_background=False),
        ("coco14-raw", True): coco_raw_id2label(with_background=True),
    }
