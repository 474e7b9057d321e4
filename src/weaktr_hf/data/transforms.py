"""Per-sample transforms for both WeakTr steps, applied to rows of the WSSS schema.

A transform takes one row (`image` PIL, `labels`, `semantic_mask` PIL or None, `id`) and returns
`{"pixel_values": float tensor (3, H, W), "labels": list of ids, "id": str}` plus `"semantic_mask"` (int64 tensor
(H, W), 255 = ignore) when the row has a mask. Image and mask go through the same geometric operations (torchvision
`tv_tensors.Image` / `tv_tensors.Mask`), so they stay aligned. Use `as_dataset_transform(t)` with
`Dataset.with_transform`, then a collator from `weaktr_hf.data.collators`.
"""

import random

import numpy as np
import PIL.Image
import torch
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..image_processing_weaktr import pil_image_to_uint8
from ..labels import IGNORE_INDEX
from .schema import mask_to_array

CAM_AUGMENTATIONS = ("timm", "light", "none")
# Masks take the label of the pixel whose centre is nearest; plain "nearest" picks floor(x * scale) and shifts masks
# by up to half a pixel against the bilinearly resized image.
_MASK_INTERPOLATION = v2.InterpolationMode.NEAREST_EXACT


def _pair(size):
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _to_image_tensor(image):
    """A uint8 `tv_tensors.Image` (3, H, W) from a PIL image of any mode, converted as the processor converts it."""
    return tv_tensors.Image(torch.from_numpy(pil_image_to_uint8(image)).permute(2, 0, 1))


def _to_mask_tensor(mask, name):
    """A `tv_tensors.Mask` (H, W) of class indices (uint8 when they fit), from a PIL mask or an array."""
    array = np.asarray(mask_to_array(mask, name))
    fits_uint8 = array.size == 0 or (array.min() >= 0 and array.max() <= 255)
    return tv_tensors.Mask(torch.from_numpy(array.astype(np.uint8 if fits_uint8 else np.int64)))


def _normalize(image, mean, std):
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), mean=list(mean), std=list(std))


def _output(example, pixel_values, mask=None):
    out = {"pixel_values": pixel_values.as_subclass(torch.Tensor), "labels": list(example["labels"])}
    if "id" in example:
        out["id"] = example["id"]
    if mask is not None:
        out["semantic_mask"] = mask.as_subclass(torch.Tensor).to(torch.int64)
    return out


class CAMTrainTransform:
    """Step-1 training augmentation of the image (image-level labels pass through).

    `augment="timm"` is the authors' DeiT recipe through `timm.data.create_transform` (random resized crop, flip,
    RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 in pixel mode, bicubic). `"light"` (random resized crop
    with scale 0.5-1 and flip) suits a small model trained from scratch on the synthetic data, where strong
    augmentation slows learning down; `"none"` only resizes.
    """

    def __init__(
        self,
        input_size=224,
        augment="timm",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.4,
        re_prob=0.25,
        re_mode="pixel",
        interpolation="bicubic",
        light_scale=(0.5, 1.0),
    ):
        if augment not in CAM_AUGMENTATIONS:
            raise ValueError(f"augment must be one of {CAM_AUGMENTATIONS}, got {augment!r}.")
        size = _pair(input_size)
        self.augment = augment
        if augment == "timm":
            self.transform = create_transform(
                input_size=size,
                is_training=True,
                auto_augment=auto_augment,
                color_jitter=color_jitter,
                re_prob=re_prob,
                re_mode=re_mode,
                interpolation=interpolation,
                mean=tuple(mean),
                std=tuple(std),
            )
            return
        mode = v2.InterpolationMode(interpolation)
        geometric = (
            [v2.RandomResizedCrop(size, scale=tuple(light_scale), interpolation=mode), v2.RandomHorizontalFlip()]
            if augment == "light"
            else [v2.Resize(size, interpolation=mode)]
        )
        self.transform = v2.Compose(
            [v2.PILToTensor(), *geometric, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        )

    def __call__(self, example):
        pixel_values = self.transform(PIL.Image.fromarray(pil_image_to_uint8(example["image"])))
        return _output(example, pixel_values)


class PhotoMetricDistortion:
    """Random brightness, contrast, saturation and hue changes, each with probability 1/2, as in mmseg's step-2 recipe.

    Brightness adds up to +-`brightness_delta` (0..255 scale); contrast and saturation multiply by a factor in
    `contrast_range` / `saturation_range`; hue shifts by up to +-`hue_delta` on OpenCV's 0..180 hue scale. Contrast
    comes before or after the colour changes at random. Works on uint8 images and returns uint8.
    """

    def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def _contrast(self, image):
        if random.random() < 0.5:
            return (image * random.uniform(*self.contrast_range)).clamp(0, 1)
        return image

    def __call__(self, image):
        out = F.to_dtype(image, torch.float32, scale=True)
        if random.random() < 0.5:
            out = (out + random.uniform(-self.brightness_delta, self.brightness_delta) / 255).clamp(0, 1)
        contrast_first = random.random() < 0.5
        if contrast_first:
            out = self._contrast(out)
        if random.random() < 0.5:
            out = F.adjust_saturation(out, random.uniform(*self.saturation_range))
        if random.random() < 0.5:
            out = F.adjust_hue(out, random.randint(-self.hue_delta, self.hue_delta) / 180)
        if not contrast_first:
            out = self._contrast(out)
        return tv_tensors.Image(F.to_dtype(out, torch.uint8, scale=True))


def cat_max_ratio_crop(mask, crop_size, cat_max_ratio=0.75, max_tries=10, ignore_index=IGNORE_INDEX):
    """(top, left, height, width) of a random crop in which no class covers more than `cat_max_ratio` of the labelled
    pixels, retried up to `max_tries` times (the last try is kept), as mmseg's `RandomCrop(cat_max_ratio=...)`.

    A crop holding a single class is always retried. The crop is clipped to the image; padding comes later.
    """
    height, width = mask.shape[-2:]
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    for _ in range(max(max_tries, 1)):
        top = random.randint(0, height - crop_h)
        left = random.randint(0, width - crop_w)
        if cat_max_ratio >= 1:
            break
        window = mask[..., top : top + crop_h, left : left + crop_w]
        counts = torch.bincount(window[window != ignore_index].flatten().to(torch.int64))
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
    return top, left, crop_h, crop_w


class SegmentationTrainTransform:
    """Step-2 training augmentation of image and mask together (the authors' mmseg recipe).

    Random rescale so the shorter side is `base_size` x a ratio in `scale_range` (the longer side capped at
    `max_ratio` x `base_size` x ratio: 4 is mmseg's (2048, 512) scale, the authors' step 2 uses 8), random crop of
    `crop_size` in which no class covers more than `cat_max_ratio` (up to `crop_max_tries` tries), horizontal flip,
    photometric distortion, normalisation, then padding to `crop_size` (image 0, mask `ignore_index`). `mask_key`
    names the column with the training labels (e.g. pseudo-labels put in `semantic_mask`). `antialias=False` resizes
    like mmseg's cv2 bilinear (no antialiasing).
    """

    def __init__(
        self,
        crop_size=480,
        base_size=512,
        scale_range=(0.5, 2.0),
        max_ratio=4,
        antialias=True,
        cat_max_ratio=0.75,
        crop_max_tries=10,
        flip_prob=0.5,
        photometric=True,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        ignore_index=IGNORE_INDEX,
        mask_key="semantic_mask",
    ):
        self.crop_size = _pair(crop_size)
        self.base_size = base_size
        self.scale_range = tuple(scale_range)
        self.max_ratio = max_ratio
        self.antialias = antialias
        self.cat_max_ratio = cat_max_ratio
        self.crop_max_tries = crop_max_tries
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.mask_key = mask_key

    def _rescale(self, image, mask):
        height, width = image.shape[-2:]
        ratio = random.uniform(*self.scale_range)
        scale = min(
            self.base_size * ratio / min(height, width), self.max_ratio * self.base_size * ratio / max(height, width)
        )
        size = [max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))]
        return F.resize(image, size, antialias=self.antialias), F.resize(mask, size, interpolation=_MASK_INTERPOLATION)

    def __call__(self, example):
        if example.get(self.mask_key) is None:
            raise ValueError(
                f"sample {example.get('id')} has no {self.mask_key!r}; step-2 training needs a mask (ground truth or "
                "pseudo-labels) for every sample."
            )
        image = _to_image_tensor(example["image"])
        mask = _to_mask_tensor(example[self.mask_key], example.get("id", self.mask_key))
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"sample {example.get('id')}: image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} "
                "differ in size."
            )
        image, mask = self._rescale(image, mask)
        top, left, height, width = cat_max_ratio_crop(
            mask, self.crop_size, self.cat_max_ratio, self.crop_max_tries, self.ignore_index
        )
        image, mask = F.crop(image, top, left, height, width), F.crop(mask, top, left, height, width)
        if random.random() < self.flip_prob:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        if self.photometric is not None:
            image = self.photometric(image)
        pixel_values = _normalize(image, self.mean, self.std)
        pad = [0, 0, self.crop_size[1] - width, self.crop_size[0] - height]  # left, top, right, bottom
        pixel_values = F.pad(pixel_values, pad, fill=0)
        mask = F.pad(mask, pad, fill=self.ignore_index)
        return _output(example, pixel_values, mask)


class EvalTransform:
    """Evaluation: optional resize and normalisation only.

    `size` is None (keep the image size), an int (square) or (height, width). The mask keeps its original resolution
    (score predictions there) unless `resize_mask=True`, which resizes it with nearest neighbours.
    `SegmentationCollator` batches images of different original sizes only with `resize_mask=True` (else it cannot
    align masks and logits).
    """

    def __init__(
        self,
        size=None,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        interpolation="bilinear",
        resize_mask=False,
        mask_key="semantic_mask",
    ):
        self.size = None if size is None else list(_pair(size))
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = v2.InterpolationMode(interpolation)
        self.resize_mask = resize_mask
        self.mask_key = mask_key

    def __call__(self, example):
        image = _to_image_tensor(example["image"])
        if self.size is not None:
            image = F.resize(image, self.size, interpolation=self.interpolation, antialias=True)
        mask = example.get(self.mask_key)
        if mask is not None:
            mask = _to_mask_tensor(mask, example.get("id", self.mask_key))
            if self.resize_mask and self.size is not None:
                mask = F.resize(mask, self.size, interpolation=_MASK_INTERPOLATION)
        return _output(example, _normalize(image, self.mean, self.std), mask)


def as_dataset_transform(transform):
    """Wrap a per-sample transform for `Dataset.with_transform` / `set_transform`, which pass batches of columns."""

    def apply(batch):
        columns = list(batch)
        rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        outputs = [transform(row) for row in rows]
        keys = list(outputs[0]) if outputs else []
        return {key: [out.get(key) for out in outputs] for key in keys}

    return apply
