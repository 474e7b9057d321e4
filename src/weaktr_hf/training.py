"""The training loop both WeakTr steps share, with Accelerate: optimisers, schedules, atomic checkpoints, resume.

`examples/train.py` wires these pieces into the recipe; nothing here reads command-line arguments.
"""

import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------------------------------
# Optimisers and schedules of the two steps
# ---------------------------------------------------------------------------------------------------------------------


def _no_weight_decay(name, parameter):
    """Biases, norms, tokens, position and class embeddings are not decayed (as DeiT / Segmenter)."""
    return parameter.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "cls_emb"))


def build_cam_optimizer(model, learning_rate, weight_decay=0.03, betas=(0.9, 0.999)):
    """Step 1: AdamW (paper: lr 6e-4 x batch / 512, weight decay 0.03), no decay on 1-d parameters and tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if _no_weight_decay(name, parameter) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def build_seg_optimizer(model, learning_rate, encoder_lr_scale=0.1, momentum=0.9, weight_decay=0.0):
    """Step 2: SGD with momentum (paper: lr 1e-4, momentum 0.9, no weight decay); the encoder at `encoder_lr_scale`."""
    encoder, decoder = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (encoder if name.startswith("weaktr.") else decoder).append(parameter)
    groups = [
        {"params": encoder, "lr": learning_rate * encoder_lr_scale},
        {"params": decoder, "lr": learning_rate},
    ]
    return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)


def build_scheduler(name, optimizer, num_training_steps, num_warmup_steps=0):
    """`"cosine"` (step 1: cosine with warm-up) or `"poly"` (step 2: polynomial decay, power 0.9), per update step."""
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    if name == "poly":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps, num_training_steps, lr_end=0.0, power=0.9
        )
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"Unknown lr schedule {name!r}: use 'cosine', 'poly' or 'constant'.")


# ---------------------------------------------------------------------------------------------------------------------
# Reproducible augmentation
# ---------------------------------------------------------------------------------------------------------------------


class SeededTransformDataset(torch.utils.data.Dataset):
    """
    Applies a random `transform` to each sample under RNGs seeded from `(seed, epoch, index)`.

    Random augmentation then does not depend on how far the global RNG has run, which it otherwise does through
    data-loader prefetching: a resumed run sees exactly the augmentations an uninterrupted run would, whatever the
    number of workers. `train_model` calls `set_epoch`.
    """

    def __init__(self, dataset, transform, seed=0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed)
                return self.transform(self.dataset[int(index)])
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Loop position and best-epoch bookkeeping, saved inside every checkpoint (`register_for_checkpointing`)."""

    completed_steps: int = 0
    epoch: int = 0
    epoch_steps: int = 0  # updates done in `epoch` so far (to skip its used batches on resume)
    best_metric: float = -math.inf
    best_epoch: int = -1

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


def find_latest_checkpoint(checkpoint_dir):
    """The finished checkpoint with the most steps under `checkpoint_dir` (`step_<n>`), or None.

    Half-written checkpoints live under a temporary name until complete, so they are never picked.
    """
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = [
        (int(match.group(1)), name)
        for name in os.listdir(checkpoint_dir)
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(checkpoint_dir, name))
    ]
    return os.path.join(checkpoint_dir, max(steps)[1]) if steps else None


def resolve_checkpoint(resume_from_checkpoint, checkpoint_dir):
    """`"latest"` -> newest finished checkpoint under `checkpoint_dir` (None if there is none); a path -> itself."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(checkpoint_dir)
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder; use 'latest' or a "
            f"step_<n> folder under {checkpoint_dir}."
        )
    return resume_from_checkpoint


def save_checkpoint(accelerator, checkpoint_dir, step, total_limit=None):
    """`accelerator.save_state` into a temporary folder, renamed to `step_<step>` only once every file is written."""
    final = os.path.join(checkpoint_dir, f"step_{step}")
    temporary = os.path.join(checkpoint_dir, f".tmp_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit:
            _prune_checkpoints(checkpoint_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(checkpoint_dir, total_limit):
    steps = sorted(
        int(match.group(1)) for name in os.listdir(checkpoint_dir) if (match := CHECKPOINT_PATTERN.match(name))
    )
    for step in steps[:-total_limit]:
        shutil.rmtree(os.path.join(checkpoint_dir, f"step_{step}"), ignore_errors=True)


def save_pretrained_atomic(model, directory, image_processor=None, is_main_process=True):
    """`save_pretrained` (model and processor) into a temporary folder, then swap it in: no half-written model."""
    if not is_main_process:
        return directory
    directory = os.path.abspath(directory)
    temporary, previous = directory + ".tmp", directory + ".old"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    if image_processor is not None:
        image_processor.save_pretrained(temporary)
    if os.path.exists(directory):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
    os.replace(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)
    return directory


def write_json_atomic(path, data):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def _loss_terms(outputs):
    """Every loss field of a model output (`loss`, and for step 1 `class_loss`, `coarse_loss`, `fine_loss`)."""
    return {key: value for key, value in outputs.items() if key.endswith("loss") and value is not None}


def train_model(
    accelerator,
    model,
    optimizer,
    lr_scheduler,
    train_dataloader,
    *,
    max_train_steps,
    checkpoint_dir,
    checkpointing_steps=None,
    checkpoints_total_limit=None,
    resume_from_checkpoint=None,
    train_state=None,
    on_epoch_end=None,
    log_prefix="train",
    logging_steps=10,
):
    """
    Train `model` (already `accelerator.prepare`d with its optimiser, scheduler and dataloader) for
    `max_train_steps` optimiser updates.

    - `checkpointing_steps`: an int N (every N updates), `"epoch"`, or None; a final checkpoint is always written.
    - `resume_from_checkpoint`: `"latest"` or a checkpoint folder; restores model, optimiser, scheduler, RNG states
      and the loop position, and skips the batches of the interrupted epoch that were already used.
    - `on_epoch_end(epoch, train_state)`: called after each epoch (e.g. to evaluate and keep the best model).
    - A non-finite loss stops training with an error naming the step.

    For exact resumption, random augmentation should go through `SeededTransformDataset` and the DataLoader should
    have its own `generator` (so creating an iterator draws nothing from the global RNG).

    `train_state` (a `TrainState`, new if None) is registered for checkpointing here unless it already is, so
    checkpoints carry the loop position; it is returned.
    """
    train_state = train_state if train_state is not None else TrainState()
    if not any(obj is train_state for obj in accelerator._custom_objects):
        accelerator.register_for_checkpointing(train_state)
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    checkpoint = resolve_checkpoint(resume_from_checkpoint, checkpoint_dir)
    if checkpoint:
        accelerator.print(f"Resuming from checkpoint {checkpoint}")
        accelerator.load_state(checkpoint)
    resume_batches = train_state.epoch_steps * accelerator.gradient_accumulation_steps

    progress = tqdm(
        total=max_train_steps, initial=train_state.completed_steps, desc=log_prefix,
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    start_epoch = train_state.epoch
    for epoch in range(start_epoch, num_epochs):
        if train_state.completed_steps >= max_train_steps:
            break
        train_state.epoch = epoch
        model.train()
        if hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)
        if hasattr(getattr(train_dataloader, "dataset", None), "set_epoch"):
            train_dataloader.dataset.set_epoch(epoch)
        batches = train_dataloader
        if epoch == start_epoch and resume_batches > 0:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{log_prefix}: loss is {loss.item()} at step {train_state.completed_steps + 1} (epoch "
                        f"{epoch}); stopping. Lower the learning rate or check the data and labels."
                    )
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            train_state.completed_steps += 1
            train_state.epoch_steps += 1
            progress.update(1)
            if train_state.completed_steps % logging_steps == 0 or train_state.completed_steps == max_train_steps:
                values = {f"{log_prefix}/{key}": value.detach().item() for key, value in _loss_terms(outputs).items()}
                values[f"{log_prefix}/lr"] = lr_scheduler.get_last_lr()[-1]
                progress.set_postfix({key.split("/")[-1]: round(value, 4) for key, value in values.items()})
                accelerator.log(values, step=train_state.completed_steps)
            if isinstance(checkpointing_steps, int) and train_state.completed_steps % checkpointing_steps == 0:
                save_checkpoint(accelerator, checkpoint_dir, train_state.completed_steps, checkpoints_total_limit)
            if train_state.completed_steps >= max_train_steps:
                break
        train_state.epoch, train_state.epoch_steps = epoch + 1, 0
        if on_epoch_end is not None:
            on_epoch_end(epoch, train_state)
        if checkpointing_steps == "epoch":
            save_checkpoint(accelerator, checkpoint_dir, train_state.completed_steps, checkpoints_total_limit)
    progress.close()
    if find_latest_checkpoint(checkpoint_dir) != os.path.join(checkpoint_dir, f"step_{train_state.completed_steps}"):
        save_checkpoint(accelerator, checkpoint_dir, train_state.completed_steps, checkpoints_total_limit)
    return train_state


def release_training_state(accelerator):
    """Forget the prepared objects and checkpointed states of a finished stage.

    Without this, a later stage's checkpoints would also hold the earlier stage's model and state, and could not be
    resumed by a run that prepares only the later stage.
    """
    accelerator.clear()
    accelerator._custom_objects.clear()  # `clear` leaves objects registered for checkpointing in place


__all__ = [
    "SeededTransformDataset",
    "TrainState",
    "build_cam_optimizer",
    "build_scheduler",
    "build_seg_optimizer",
    "find_latest_checkpoint",
    "release_training_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_pretrained_atomic",
    "train_model",
    "write_json_atomic",
]
