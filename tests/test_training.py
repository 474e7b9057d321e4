"""The shared training loop: optimisers, atomic checkpoints, and resume that really resumes."""

import os
import random

import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset

from weaktr_hf import WeakTrConfig, WeakTrForCAM
from weaktr_hf.training import (
    SeededTransformDataset,
    UpdateStepCosineScheduler,
    build_cam_optimizer,
    build_scheduler,
    build_seg_optimizer,
    find_latest_checkpoint,
    save_pretrained_atomic,
    train_model,
)


def tiny_config(**overrides):
    values = dict(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, aaf_reduction=2, aaf_feat_reduction=2, drop_path_rate=0.1,
        decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )  # fmt: skip
    values.update(overrides)
    return WeakTrConfig(**values)


class FixedCAMData(Dataset):
    def __init__(self, size=10):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(size, 3, 16, 16, generator=generator)
        self.labels = (torch.rand(size, 3, generator=generator) > 0.5).float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def random_augmentation(sample):
    """Noise and a random flip drawn from the global RNGs, as torchvision / timm augmentations do."""
    image = sample["pixel_values"] + 0.5 * torch.randn(3, 16, 16)
    if random.random() < 0.5:
        image = image.flip(-1)
    return {"pixel_values": image, "labels": sample["labels"]}


def run(tmp_path, max_train_steps, resume=None, checkpointing_steps=None, seed=0, per_epoch_schedule=False):
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(seed)
    model = WeakTrForCAM(tiny_config())
    optimizer = build_cam_optimizer(model, learning_rate=1e-3)
    data = SeededTransformDataset(FixedCAMData(), random_augmentation, seed=seed)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if per_epoch_schedule:  # the recipe's way: timm's scheduler per epoch, left out of `prepare`
        scheduler = UpdateStepCosineScheduler(optimizer, num_training_steps=9, steps_per_epoch=3, num_epochs=3,
                                              warmup_epochs=1, warmup_lr_init=1e-5, lr_min=1e-4)  # fmt: skip
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:
        scheduler = build_scheduler("cosine", optimizer, num_training_steps=6, num_warmup_steps=1)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = train_model(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=max_train_steps,
        checkpoint_dir=str(tmp_path / "checkpoints"), checkpointing_steps=checkpointing_steps,
        resume_from_checkpoint=resume,
    )  # fmt: skip
    return accelerator.unwrap_model(model).state_dict(), state


@pytest.mark.parametrize("per_epoch_schedule", [False, True], ids=["prepared_cosine", "unprepared_timm_per_epoch"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, per_epoch_schedule):
    # The per-epoch schedule runs 3 epochs, so the lr of the last one depends on the restored scheduler state.
    total = 9 if per_epoch_schedule else 6
    straight, _ = run(tmp_path / "a", max_train_steps=total, per_epoch_schedule=per_epoch_schedule)
    # Interrupted after 4 steps (mid-epoch: 3 batches per epoch), then resumed from the latest checkpoint.
    run(tmp_path / "b", max_train_steps=4, checkpointing_steps=4, per_epoch_schedule=per_epoch_schedule)
    assert find_latest_checkpoint(str(tmp_path / "b" / "checkpoints")).endswith("step_4")
    resumed, state = run(tmp_path / "b", max_train_steps=total, resume="latest", per_epoch_schedule=per_epoch_schedule)
    assert state.completed_steps == total
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


def test_seeded_transforms_depend_on_seed_epoch_and_index_only():
    data = SeededTransformDataset(FixedCAMData(), random_augmentation, seed=1)
    first = data[3]["pixel_values"]
    torch.randn(100)  # the global RNG moving on must not matter
    torch.testing.assert_close(data[3]["pixel_values"], first)
    assert not torch.equal(data[4]["pixel_values"] - FixedCAMData()[4]["pixel_values"], first)
    data.set_epoch(1)
    assert not torch.equal(data[3]["pixel_values"], first)


def test_resume_without_checkpoint_starts_fresh_and_bad_path_is_an_error(tmp_path):
    _, state = run(tmp_path, max_train_steps=2, resume="latest")
    assert state.completed_steps == 2
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        run(tmp_path, max_train_steps=2, resume=str(tmp_path / "nope"))


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_2").mkdir(parents=True)
    (checkpoints / ".tmp_step_9").mkdir()
    (checkpoints / "step_x").mkdir()
    assert find_latest_checkpoint(str(checkpoints)) == str(checkpoints / "step_2")


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    model = WeakTrForCAM(tiny_config())
    optimizer = build_cam_optimizer(model, learning_rate=1e-3)
    scheduler = build_scheduler("constant", optimizer, num_training_steps=1)
    batch = {"pixel_values": torch.full((2, 3, 16, 16), float("nan")), "labels": torch.ones(2, 3)}
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train_model(accelerator, model, optimizer, scheduler, [batch], max_train_steps=1,
                    checkpoint_dir=str(tmp_path))  # fmt: skip


def test_optimizers_follow_the_recipes():
    model = WeakTrForCAM(tiny_config())
    adamw = build_cam_optimizer(model, learning_rate=1e-3, weight_decay=0.03)
    decayed = {id(p) for p in adamw.param_groups[0]["params"]}
    assert id(model.weaktr.cls_token) not in decayed and id(model.head.weight) in decayed
    assert adamw.param_groups[1]["weight_decay"] == 0.0

    from weaktr_hf import WeakTrForSemanticSegmentation

    seg = WeakTrForSemanticSegmentation(tiny_config())
    sgd = build_seg_optimizer(seg, learning_rate=1e-4, encoder_lr_scale=0.1)
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-5) and sgd.param_groups[1]["lr"] == pytest.approx(1e-4)
    assert len(sgd.param_groups[0]["params"]) + len(sgd.param_groups[1]["params"]) == len(list(seg.parameters()))


def test_save_pretrained_atomic_replaces_a_previous_model(tmp_path):
    target = tmp_path / "cam"
    save_pretrained_atomic(WeakTrForCAM(tiny_config()), str(target))
    save_pretrained_atomic(WeakTrForCAM(tiny_config(num_labels=2, id2label=None)), str(target))
    assert WeakTrForCAM.from_pretrained(str(target)).config.num_labels == 2
    assert sorted(os.listdir(tmp_path)) == ["cam"]
