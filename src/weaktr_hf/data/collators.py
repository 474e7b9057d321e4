"""Batch collators that turn transformed samples into model inputs.

`CAMCollator` gives step 1 its `pixel_values` and multi-hot `labels` (B, C); `SegmentationCollator` gives step 2
its `pixel_values` and `labels` masks (B, H, W). With `return_image_ids=True` a batch also carries `image_ids`
(a list of strings) for stages that write one file per image (CAMs, pseudo-labels); pop it before calling the model.
"""

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX

IMAGE_IDS_KEY = "image_ids"


def _stack_pixel_values(examples):
    shapes = {tuple(example["pixel_values"].shape) for example in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"pixel_values of different shapes {sorted(shapes)} in one batch; use a transform with a fixed size "
            "(CAMTrainTransform, or EvalTransform(size=...)) or batch size 1."
        )
    return torch.stack([example["pixel_values"] for example in examples])


def _image_ids(examples):
    missing = [i for i, example in enumerate(examples) if "id" not in example]
    if missing:
        raise ValueError(f"samples {missing} of the batch have no 'id'; keep the 'id' column to return image ids.")
    return [example["id"] for example in examples]


class CAMCollator:
    """Step-1 batches: `pixel_values` (B, 3, H, W) float and multi-hot `labels` (B, num_labels) float."""

    def __init__(self, num_labels, return_image_ids=False):
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
        self.num_labels = num_labels
        self.return_image_ids = return_image_ids

    def multi_hot(self, labels, sample_id=None):
        """Multi-hot float vector of one sample's foreground class ids."""
        target = torch.zeros(self.num_labels, dtype=torch.float32)
        for label in labels:
            if not 0 <= int(label) < self.num_labels:
                raise ValueError(
                    f"sample {sample_id} has class id {label} outside 0..{self.num_labels - 1}; the collator's "
                    "num_labels must be the number of foreground classes of the dataset."
                )
            target[int(label)] = 1.0
        return target

    def __call__(self, examples):
        batch = {
            "pixel_values": _stack_pixel_values(examples),
            "labels": torch.stack([self.multi_hot(example["labels"], example.get("id")) for example in examples]),
        }
        if self.return_image_ids:
            batch[IMAGE_IDS_KEY] = _image_ids(examples)
        return batch


class SegmentationCollator:
    """Step-2 batches: `pixel_values` (B, 3, H, W) float and `labels` (B, H, W) int64 masks (255 = ignore).

    Samples of different sizes are padded at the bottom/right to the largest in the batch: images with 0 (the mean
    colour after normalisation), masks with `ignore_index`, so padding is never scored. Each sample's mask comes from
    `mask_key` (the transforms' `semantic_mask`).

    The model scores its logits, stretched over the whole `labels` canvas, against it, so every mask must cover its
    image: masks of their image's size, or (e.g. `EvalTransform(size=...)` keeping masks at the original resolution)
    one image size and one mask size for the whole batch. Other batches are refused, since padding would pair pixels
    with the wrong labels: resize the masks too (`resize_mask=True`) or use batch size 1.
    """

    def __init__(self, ignore_index=IGNORE_INDEX, return_image_ids=False, mask_key="semantic_mask"):
        self.ignore_index = ignore_index
        self.return_image_ids = return_image_ids
        self.mask_key = mask_key

    @staticmethod
    def _pad_to(tensor, height, width, value):
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

    @staticmethod
    def _check_masks_cover_images(examples, images, masks):
        image_sizes = [tuple(image.shape[-2:]) for image in images]
        mask_sizes = [tuple(mask.shape[-2:]) for mask in masks]
        if image_sizes == mask_sizes or (len(set(image_sizes)) == 1 and len(set(mask_sizes)) == 1):
            return
        pairs = [
            f"{example.get('id', i)}: image {image} mask {mask}"
            for i, (example, image, mask) in enumerate(zip(examples, image_sizes, mask_sizes, strict=True))
        ]
        raise ValueError(
            f"masks of other sizes than their images, of different sizes in one batch ({'; '.join(pairs[:4])}): "
            "padded to one canvas, the logits stretched over it would be scored against the wrong pixels. Resize "
            "masks with their images (EvalTransform(size=..., resize_mask=True)) or use batch size 1."
        )

    def __call__(self, examples):
        missing = [example.get("id", i) for i, example in enumerate(examples) if example.get(self.mask_key) is None]
        if missing:
            raise ValueError(f"samples {missing} have no {self.mask_key!r}; step-2 batches need a mask per sample.")
        images = [example["pixel_values"] for example in examples]
        masks = [torch.as_tensor(example[self.mask_key]).to(torch.int64) for example in examples]
        self._check_masks_cover_images(examples, images, masks)
        image_h, image_w = max(t.shape[-2] for t in images), max(t.shape[-1] for t in images)
        mask_h, mask_w = max(t.shape[-2] for t in masks), max(t.shape[-1] for t in masks)
        batch = {
            "pixel_values": torch.stack([self._pad_to(image, image_h, image_w, 0.0) for image in images]),
            "labels": torch.stack([self._pad_to(mask, mask_h, mask_w, self.ignore_index) for mask in masks]),
        }
        if self.return_image_ids:
            batch[IMAGE_IDS_KEY] = _image_ids(examples)
        return batch
