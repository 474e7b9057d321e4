"""Transforms keep image and mask aligned, apply the crop cap and padding, and collators build model inputs."""

import random

import numpy as np
import PIL.Image
import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from weaktr_hf.data import (
    IMAGE_IDS_KEY,
    CAMCollator,
    CAMTrainTransform,
    EvalTransform,
    SegmentationCollator,
    SegmentationTrainTransform,
    as_dataset_transform,
    load_wsss_dataset,
)
from weaktr_hf.data.transforms import cat_max_ratio_crop


def block_sample(height=60, width=90, block=6, seed=0):
    """An image whose grey level and a mask whose class follow the same random block pattern (no symmetry, so any
    flip or shift of one against the other shows)."""
    blocks = np.random.default_rng(seed).integers(0, 2, (height // block + 1, width // block + 1), dtype=np.uint8)
    pattern = blocks.repeat(block, 0).repeat(block, 1)[:height, :width]
    image = PIL.Image.fromarray(np.repeat((pattern * 200 + 30)[..., None], 3, axis=2).astype(np.uint8))
    return {"image": image, "semantic_mask": PIL.Image.fromarray(pattern + 1), "labels": [0, 1], "id": "blocks"}


def denormalized_grey(pixel_values):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (pixel_values * std + mean).mean(0)


def agreement(pixel_values, mask):
    """Share of labelled pixels away from class edges whose brightness (above mid grey) matches mask class 2.

    Pixels next to an edge are left out: resizing blurs the image there, while a misaligned mask disagrees inside
    the blocks too.
    """
    grey = denormalized_grey(pixel_values)
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")
    neighbours = torch.nn.functional.unfold(padded, 3)[0].reshape(9, *mask.shape)
    interior = (neighbours == mask.float()).all(0) & (mask != 255)
    bright = grey > (grey[interior].min() + grey[interior].max()) / 2
    return ((bright == (mask == 2)) & interior).sum().item() / interior.sum().item()


@pytest.mark.parametrize("seed", range(6))
def test_segmentation_train_transform_keeps_image_and_mask_aligned(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    transform = SegmentationTrainTransform(crop_size=48, base_size=60, photometric=True)

    out = transform(block_sample())

    assert out["pixel_values"].shape == (3, 48, 48) and out["semantic_mask"].shape == (48, 48)
    assert out["semantic_mask"].dtype == torch.int64
    assert agreement(out["pixel_values"], out["semantic_mask"]) > 0.98
    # the check has teeth: the same output with the mask flipped or shifted disagrees
    assert agreement(out["pixel_values"], out["semantic_mask"].flip(-1)) < 0.85
    assert agreement(out["pixel_values"], out["semantic_mask"].roll(24, dims=0)) < 0.85


def test_crop_cap_avoids_single_class_crops():
    mask = torch.zeros(100, 100, dtype=torch.uint8)
    mask[:, :30] = 1  # a strip of class 1: half of all 40x40 crops hold only background
    random.seed(0)
    capped = [cat_max_ratio_crop(mask, (40, 40), cat_max_ratio=0.75, max_tries=10) for _ in range(30)]
    random.seed(0)
    uncapped = [cat_max_ratio_crop(mask, (40, 40), cat_max_ratio=1.0) for _ in range(30)]

    def top_share(crop):
        top, left, height, width = crop
        window = mask[top : top + height, left : left + width]
        return torch.bincount(window.flatten().long()).max().item() / window.numel()

    # a try succeeds for 19 of 61 crop positions, so 10 tries all fail with probability (42/61)^10 = 2.4%
    assert sum(top_share(c) < 0.75 for c in capped) >= 27
    assert sum(top_share(c) == 1.0 for c in uncapped) >= 8


def test_small_images_are_padded_with_zero_and_ignore():
    random.seed(0)
    transform = SegmentationTrainTransform(crop_size=(64, 96), base_size=30, scale_range=(1.0, 1.0), photometric=False)

    out = transform(block_sample(height=60, width=90))  # rescaled to 30x45, then padded

    assert (out["semantic_mask"][30:] == 255).all() and (out["semantic_mask"][:, 45:] == 255).all()
    assert (out["semantic_mask"][:30, :45] != 255).all()
    assert (out["pixel_values"][:, 30:] == 0).all() and (out["pixel_values"][:, :, 45:] == 0).all()


def test_missing_mask_for_step_two_is_an_error():
    with pytest.raises(ValueError, match="sample blocks has no 'semantic_mask'"):
        SegmentationTrainTransform(crop_size=32)({**block_sample(), "semantic_mask": None})


def test_eval_transform_resizes_the_image_and_keeps_the_mask():
    sample = block_sample()

    out = EvalTransform(size=(32, 48))(sample)
    resized = EvalTransform(size=(32, 48), resize_mask=True)(sample)

    assert out["pixel_values"].shape == (3, 32, 48)
    np.testing.assert_array_equal(out["semantic_mask"].numpy(), np.array(sample["semantic_mask"]))
    assert resized["semantic_mask"].shape == (32, 48)
    assert set(resized["semantic_mask"].unique().tolist()) == {1, 2}
    assert agreement(resized["pixel_values"], resized["semantic_mask"]) > 0.99


@pytest.mark.parametrize("augment", ["timm", "light", "none"])
def test_cam_transform_and_collator_give_model_inputs(augment):
    raw = load_wsss_dataset("synthetic", split="train", num_classes=4, image_size=48, num_train=6)
    dataset = raw.with_transform(as_dataset_transform(CAMTrainTransform(input_size=32, augment=augment)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=CAMCollator(4, return_image_ids=True))

    batch = next(iter(loader))

    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (3, 4) and batch["labels"].dtype == torch.float32
    for row, labels in zip(batch["labels"], raw[:3]["labels"], strict=True):
        assert row.nonzero().flatten().tolist() == labels
    assert batch[IMAGE_IDS_KEY] == [f"synthetic_train_{i:06d}" for i in range(3)]


def test_segmentation_collator_pads_masks_with_ignore_and_keeps_ids():
    examples = [
        {"pixel_values": torch.ones(3, 4, 6), "semantic_mask": torch.ones(4, 6, dtype=torch.int64), "id": "a"},
        {"pixel_values": torch.ones(3, 5, 4), "semantic_mask": torch.full((5, 4), 2), "id": "b"},
    ]

    batch = SegmentationCollator(return_image_ids=True)(examples)

    assert batch["pixel_values"].shape == (2, 3, 5, 6) and batch["labels"].shape == (2, 5, 6)
    assert batch["labels"].dtype == torch.int64
    assert (batch["labels"][0, 4] == 255).all() and (batch["labels"][1, :, 4:] == 255).all()
    assert (batch["pixel_values"][0, :, 4] == 0).all()
    assert batch["image_ids"] == ["a", "b"]
    assert IMAGE_IDS_KEY not in SegmentationCollator()(examples)


def half_bright_sample(height, width, sample_id):
    """Right half bright and class 1, left half dark and class 0."""
    pixels, mask = np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.uint8)
    pixels[:, width // 2 :], mask[:, width // 2 :] = 255, 1
    return {"image": PIL.Image.fromarray(pixels), "semantic_mask": PIL.Image.fromarray(mask), "labels": [0],
            "id": sample_id}  # fmt: skip


def test_segmentation_collator_batches_resized_images_only_with_masks_that_cover_them():
    samples = [half_bright_sample(64, 48, "a"), half_bright_sample(40, 80, "b")]
    with pytest.raises(ValueError, match="resize_mask=True"):
        SegmentationCollator()([EvalTransform(size=32)(sample) for sample in samples])
    same_size = [half_bright_sample(40, 80, "c"), half_bright_sample(40, 80, "d")]
    SegmentationCollator()([EvalTransform(size=32)(sample) for sample in same_size])  # one mask size: aligned

    batch = SegmentationCollator()([EvalTransform(size=32, resize_mask=True)(sample) for sample in samples])

    # a perfect prediction (class 1 where the image is bright), stretched over the labels as the loss does, scores 1
    bright = (batch["pixel_values"][:, 0] > 0).float()
    logits = torch.stack([1 - bright, bright], 1)
    prediction = torch.nn.functional.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear").argmax(1)
    valid = batch["labels"] != 255
    assert (prediction[valid] == batch["labels"][valid]).float().mean() > 0.97


def test_cam_collator_refuses_ids_outside_num_labels_and_mixed_sizes():
    with pytest.raises(ValueError, match="sample x has class id 4 outside 0..3"):
        CAMCollator(4)([{"pixel_values": torch.zeros(3, 8, 8), "labels": [4], "id": "x"}])
    with pytest.raises(ValueError, match="pixel_values of different shapes"):
        CAMCollator(4)(
            [
                {"pixel_values": torch.zeros(3, 8, 8), "labels": []},
                {"pixel_values": torch.zeros(3, 8, 9), "labels": []},
            ]
        )


def test_segmentation_pipeline_on_synthetic_data_end_to_end():
    dataset = load_wsss_dataset("synthetic", split="val", num_classes=3, image_size=64, num_val=4)
    dataset = dataset.with_transform(as_dataset_transform(SegmentationTrainTransform(crop_size=48, base_size=64)))

    batch = SegmentationCollator()([dataset[i] for i in range(4)])

    assert batch["pixel_values"].shape == (4, 3, 48, 48)
    values = set(batch["labels"].unique().tolist())
    assert values <= {0, 1, 2, 3, 255} and values & {1, 2, 3}
