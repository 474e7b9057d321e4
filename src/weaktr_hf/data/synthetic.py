"""A built-in weakly-supervised segmentation dataset for offline runs, tests and the demo.

Each image holds 1 to 3 objects of different classes on a cluttered background, with an exact ground-truth mask.
What makes it more than a thresholding exercise:

- a class is its SHAPE and its TEXTURE together (table below); colours are random per object, so colour says
  nothing about the class, and every texture is two random colours with a guaranteed brightness contrast;
- objects have random size (about 40-70% of the shorter side), position and rotation, may leave the frame a little,
  and occlude each other (each keeps at least 40% of its area visible);
- the background is a smooth random colour field with pixel noise, low-contrast distractor blobs and thin clutter
  lines, and a random illumination gradient covers the whole image.

A colour-threshold baseline (`trivial_baseline_miou`) therefore finds objects only roughly and cannot tell classes
apart; it scores well below 1.0 mIoU. The textures have periods of 4-8 px, so they are distinct within one 8-px
patch, and objects cover a good part of the image, so a small ViT trained from scratch can learn the classes.

Options vary the set so a recipe can be checked on more than one: more classes (up to eight), the objects' size and
count, the clutter level of the background (textured distractors included), and `texture_per_class=False`, where
every object gets a random class's texture so only its shape tells the class. `SYNTHETIC_CONFIGURATIONS` names the
combinations the demo is measured on.

==========  ================================
class       texture
==========  ================================
disc        horizontal stripes (period 6 px)
square      checkerboard (4 px cells)
triangle    dots (7 px grid)
cross       speckle (random pixels)
ring        vertical stripes (period 6 px)
star        grid lines (7 px)
crescent    diagonal stripes (period 7 px)
bar         zigzag stripes (period 6 px)
==========  ================================
"""

import io

import datasets
import numpy as np
import PIL.Image

from ..image_processing_weaktr import pil_image_to_uint8
from .schema import get_class_names, mask_to_array, metadata_description, wsss_features

SYNTHETIC_CLASSES = ("disc", "square", "triangle", "cross", "ring", "star", "crescent", "bar")
SYNTHETIC_SPLITS = ("train", "val")
# Named variants of the built-in set (options of `load_synthetic`), to check that a recipe is not tuned to one set:
# "default" is the built-in set; the others change the number of classes, the objects' size and the clutter, or
# drop the texture that goes with each class.
SYNTHETIC_CONFIGURATIONS = {
    "default": {},
    "eight-classes": {"num_classes": 8},
    "small-cluttered": {"object_size": (0.14, 0.28), "max_objects": 4, "clutter": 3},
    "shape-only": {"texture_per_class": False},
}
MIN_VISIBLE_FRACTION = 0.4  # of an object's own area, after occlusion by later objects
MIN_TEXTURE_CONTRAST = 0.3  # luminance difference of a texture's two colours, on a 0..1 scale
BASELINE_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.65, 0.05), 2))
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _interpolation_matrix(size, cells):
    """(size, cells + 1) weights that linearly interpolate cells + 1 grid values to `size` pixels."""
    position = np.linspace(0, cells, size, dtype=np.float32)
    left = np.minimum(position.astype(int), cells - 1)
    weights = np.zeros((size, cells + 1), dtype=np.float32)
    weights[np.arange(size), left] = 1 - (position - left)
    weights[np.arange(size), left + 1] = position - left
    return weights


def _smooth_field(rng, height, width, cells, channels):
    """Zero-mean random field, bilinearly interpolated from a (cells + 1)^2 grid: slow colour variations."""
    grid = rng.standard_normal((channels, cells + 1, cells + 1), dtype=np.float32)
    field = _interpolation_matrix(height, cells) @ grid @ _interpolation_matrix(width, cells).T
    return np.moveaxis(field, 0, -1)


def _shape(kind, u, v):
    """Boolean mask of a shape in object coordinates (u, v), unit radius."""
    radius = np.hypot(u, v)
    if kind == 0:  # disc
        return radius <= 1.0
    if kind == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == 2:  # equilateral triangle, circumradius 1
        inside = np.ones_like(u, dtype=bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
        return inside
    if kind == 3:  # cross
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if kind == 4:  # ring
        return (radius <= 1.0) & (radius >= 0.55)
    if kind == 5:  # five-pointed star
        angle = np.arctan2(v, u)
        return radius <= 0.5 + 0.5 * ((1 + np.cos(5 * angle)) / 2) ** 1.5
    if kind == 6:  # crescent: a disc minus a shifted disc
        return (radius <= 1.0) & (np.hypot(u - 0.55, v) > 0.75)
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.38)  # bar


def _texture(kind, rng, yy, xx):
    """Boolean two-colour pattern in image coordinates, with a random phase and a slightly jittered scale."""
    scale = rng.uniform(0.9, 1.15)
    y = yy / scale + rng.uniform(0, 64)
    x = xx / scale + rng.uniform(0, 64)
    if kind == 0:  # horizontal stripes
        return (y % 6) < 3
    if kind == 1:  # checkerboard
        return ((y // 4) + (x // 4)) % 2 == 0
    if kind == 2:  # dots
        return np.hypot((y % 7) - 3.5, (x % 7) - 3.5) < 2.0
    if kind == 3:  # speckle
        return rng.random(yy.shape) < 0.5
    if kind == 4:  # vertical stripes
        return (x % 6) < 3
    if kind == 5:  # grid lines
        return ((y % 7) < 2) | ((x % 7) < 2)
    if kind == 6:  # diagonal stripes
        return ((x + y) % 7) < 3.5
    return ((y + np.abs((x % 8) - 4)) % 6) < 3  # zigzag


def _texture_colours(rng):
    """Two random RGB colours whose luminance differs by at least MIN_TEXTURE_CONTRAST."""
    first = rng.uniform(0, 1, 3).astype(np.float32)
    candidates = rng.uniform(0, 1, (32, 3)).astype(np.float32)
    contrast = np.abs(candidates @ _LUMA - first @ _LUMA)
    good = np.flatnonzero(contrast >= MIN_TEXTURE_CONTRAST)
    second = candidates[good[0]] if good.size else np.where(first @ _LUMA > 0.5, 0.0, 1.0) * np.ones(3, np.float32)
    return first, second


def _ellipse(rng, height, width, yy, xx):
    """A random ellipse (5-20% of the shorter side per semi-axis): its bounding box and its mask inside the box."""
    side = min(height, width)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ay, ax = rng.uniform(0.05, 0.2, 2) * side
    angle = rng.uniform(0, np.pi)
    reach = max(ay, ax)  # work in the blob's bounding box only
    box = (
        slice(max(int(cy - reach), 0), int(cy + reach) + 1),
        slice(max(int(cx - reach), 0), int(cx + reach) + 1),
    )
    dx, dy = xx[box] - cx, yy[box] - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / ax
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ay
    return box, u**2 + v**2 <= 1


def _background(rng, height, width, yy, xx, clutter=1):
    """Smooth random colour field with noise, distractor blobs and thin clutter lines.

    At `clutter` 1 the blobs are close to the background colour; level c draws c times as many blobs and lines with
    c times their contrast, and adds c - 1 ellipses filled with a class texture (a texture without its shape).
    """
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    image = base + 0.10 * _smooth_field(rng, height, width, 3, 3) + 0.05 * _smooth_field(rng, height, width, 10, 3)
    side = min(height, width)
    for _ in range(rng.integers(2 * clutter, 4 * clutter + 2)):  # distractor blobs: ellipses
        box, inside = _ellipse(rng, height, width, yy, xx)
        image[box][inside] += rng.normal(0, 0.08 * clutter, 3).astype(np.float32)
    for _ in range(rng.integers(1, 3 * clutter + 1)):  # clutter lines, 1-2 px wide
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.5, 0.5) * side
        distance = (xx - width / 2) * np.sin(angle) - (yy - height / 2) * np.cos(angle) - offset
        image[np.abs(distance) <= rng.uniform(0.5, 1.0)] += rng.normal(0, 0.12 * clutter, 3).astype(np.float32)
    for _ in range(clutter - 1):  # textured distractors: a class texture in a shape no class has
        box, inside = _ellipse(rng, height, width, yy, xx)
        first, second = _texture_colours(rng)
        pattern = _texture(int(rng.integers(len(SYNTHETIC_CLASSES))), rng, yy[box], xx[box])
        image[box][inside] = np.where(pattern[inside][:, None], first, second)
    return image


def _layout(rng, height, width, classes, yy, xx, object_size=(0.2, 0.35)):
    """Shapes of the objects (drawn in order, later ones in front) and the instance map, or None if too occluded."""
    side = min(height, width)
    instance = np.full((height, width), -1, dtype=np.int64)
    shapes = []
    for j, kind in enumerate(classes):
        radius = rng.uniform(*object_size) * side
        cy = rng.uniform(0.5 * radius, height - 0.5 * radius)
        cx = rng.uniform(0.5 * radius, width - 0.5 * radius)
        angle = rng.uniform(0, 2 * np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius
        region = _shape(kind, u, v)
        shapes.append(region)
        instance[region] = j
    for j, region in enumerate(shapes):
        area = region.sum()
        if area < 0.02 * height * width or (instance == j).sum() < MIN_VISIBLE_FRACTION * area:
            return None
    return shapes, instance


def render_synthetic_sample(
    rng, height, width, num_classes, max_objects=3, object_size=(0.2, 0.35), clutter=1, texture_per_class=True
):
    """One image (uint8 RGB), its mask (0 background, k + 1 class k) and its sorted labels, drawn from `rng`.

    `object_size` is the range of an object's radius as a fraction of the shorter side, `clutter` the background's
    clutter level (1 = the built-in set), and `texture_per_class=False` gives each object the texture of a random
    class of all eight, so that only the shape tells the class.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, height, width, yy, xx, clutter)
    count = min(int(rng.integers(1, max_objects + 1)), num_classes)
    classes = rng.choice(num_classes, size=count, replace=False)
    layout = None
    for _ in range(50):
        layout = _layout(rng, height, width, classes, yy, xx, object_size)
        if layout is not None:
            break
        if len(classes) > 1 and _ == 24:  # a crowded draw keeps failing: try with one object fewer
            classes = classes[:-1]
    if layout is None:
        raise RuntimeError(f"could not place objects on a {height}x{width} image; use a larger image_size.")
    shapes, instance = layout
    mask = np.zeros((height, width), dtype=np.uint8)
    for j, kind in enumerate(classes):
        visible = np.nonzero(instance == j)
        first, second = _texture_colours(rng)
        texture = kind if texture_per_class else int(rng.integers(len(SYNTHETIC_CLASSES)))
        pattern = _texture(texture, rng, yy, xx)[visible]
        direction = rng.uniform(0, 2 * np.pi)  # soft shading across the object
        shading = 1 + 0.15 * (
            np.cos(direction) * (xx[visible] / width - 0.5) + np.sin(direction) * (yy[visible] / height - 0.5)
        )
        image[visible] = np.where(pattern[:, None], first, second) * shading[:, None]
        mask[visible] = kind + 1
    gx, gy = rng.uniform(-0.2, 0.2, 2)
    image *= (1 + gx * (xx / width - 0.5) + gy * (yy / height - 0.5))[..., None]
    image += 0.025 * rng.standard_normal(image.shape, dtype=np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    labels = sorted(int(v) - 1 for v in np.unique(mask) if v > 0)
    return image, mask, labels


def _png(array, compress_level):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return {"bytes": buffer.getvalue(), "path": None}


def _sizes(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    low, high = image_size
    if not 0 < low <= high:
        raise ValueError(f"image_size must be an int or a (min, max) pair with 0 < min <= max, got {image_size}.")
    return int(low), int(high)


def make_synthetic_split(
    split, num_samples, num_classes=4, image_size=96, seed=0, max_objects=3, object_size=(0.2, 0.35), clutter=1,
    texture_per_class=True,
):  # fmt: skip
    """One split of the synthetic dataset as a `datasets.Dataset` in the WSSS schema.

    Sample i of a split depends only on (seed, split, i): a larger split extends a smaller one, and train and val
    never share a sample. `image_size` is a side length or a (min, max) range for each side; `object_size`,
    `clutter` and `texture_per_class` are described in `render_synthetic_sample` (`SYNTHETIC_CONFIGURATIONS` names
    a few combinations).
    """
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"synthetic splits are {SYNTHETIC_SPLITS}, got {split!r}.")
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}, got {num_classes}.")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}.")
    if not 0 < object_size[0] <= object_size[1] <= 0.5:
        raise ValueError(
            f"object_size must be a (min, max) radius fraction with 0 < min <= max <= 0.5, got {object_size}."
        )
    if int(clutter) != clutter or clutter < 1:
        raise ValueError(f"clutter must be an integer level >= 1 (1 is the built-in set), got {clutter}.")
    low, high = _sizes(image_size)
    if low < 32:
        raise ValueError(f"image_size must be at least 32 px so the textures are visible, got {image_size}.")
    columns = {"image": [], "labels": [], "semantic_mask": [], "id": []}
    for i in range(num_samples):
        rng = np.random.default_rng([seed, SYNTHETIC_SPLITS.index(split), i])
        height, width = (int(v) for v in rng.integers(low, high + 1, 2))
        image, mask, labels = render_synthetic_sample(
            rng, height, width, num_classes, max_objects, object_size, int(clutter), texture_per_class
        )
        columns["image"].append(_png(image, compress_level=0))  # noisy images barely compress; save the time
        columns["semantic_mask"].append(_png(mask, compress_level=1))
        columns["labels"].append(labels)
        columns["id"].append(f"synthetic_{split}_{i:06d}")
    names = SYNTHETIC_CLASSES[:num_classes]
    parameters = {
        "num_classes": num_classes, "image_size": image_size, "seed": seed, "max_objects": max_objects,
        "object_size": list(object_size), "clutter": int(clutter), "texture_per_class": texture_per_class,
    }  # fmt: skip
    info = datasets.DatasetInfo(
        description=metadata_description(names, source="synthetic", synthetic=parameters),
        features=wsss_features(names),
    )
    return datasets.Dataset.from_dict(columns, info=info, split=split)


def load_synthetic(split=None, num_classes=4, image_size=96, num_train=1000, num_val=200, seed=0, **options):
    """The synthetic WSSS dataset: a `DatasetDict` with `train` and `val`, or one `Dataset` for one split name.

    `options` (`max_objects`, `object_size`, `clutter`, `texture_per_class`) go to `make_synthetic_split`.
    """
    sizes = {"train": num_train, "val": num_val}
    splits = SYNTHETIC_SPLITS if split is None else ([split] if isinstance(split, str) else list(split))
    result = datasets.DatasetDict(
        {
            name: make_synthetic_split(name, sizes.get(name, 0), num_classes, image_size, seed, **options)
            for name in splits
        }
    )
    return result[split] if isinstance(split, str) else result


def _distance_from_median_colour(image):
    pixels = np.asarray(pil_image_to_uint8(image) if hasattr(image, "convert") else image, dtype=np.float32) / 255
    return np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=-1)


def trivial_baseline_prediction(image, labels, threshold):
    """The colour-threshold baseline on one image: pixels whose colour is farther than `threshold` (RGB distance on
    a 0..1 scale) from the image's median colour get the first present class, the rest background."""
    first = min(labels) + 1 if len(labels) else 0
    return np.where(_distance_from_median_colour(image) > threshold, first, 0).astype(np.int64)


def trivial_baseline_miou(dataset, thresholds=BASELINE_THRESHOLDS):
    """mIoU (background included) of the colour-threshold baseline, at the best of `thresholds`.

    The baseline uses the ground-truth image-level labels and picks its threshold on the scored data itself, so the
    number is an upper bound on what flat colour thresholding achieves; a CAM method should beat it clearly.
    """
    from ..metrics import ConfusionMatrix

    thresholds = [thresholds] if np.isscalar(thresholds) else list(thresholds)
    num_labels = len(get_class_names(dataset)) + 1
    matrices = [ConfusionMatrix(num_labels) for _ in thresholds]
    for example in dataset:
        if example["semantic_mask"] is None:
            raise ValueError(f"sample {example['id']} has no semantic_mask; the baseline needs ground-truth masks.")
        reference = mask_to_array(example["semantic_mask"], example["id"])
        distance = _distance_from_median_colour(example["image"])
        first = min(example["labels"]) + 1 if example["labels"] else 0
        for threshold, matrix in zip(thresholds, matrices):
            matrix.update(np.where(distance > threshold, first, 0), reference)
    return max(matrix.compute()["mean_iou"] for matrix in matrices)
