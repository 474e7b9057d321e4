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
import time
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


def build_cam_optimizer(model, learning_rate, weight_decay=0.03, betas=(0.9, 0.999), decay_all_parameters=False):
    """
    Step 1: AdamW (paper: lr 6e-4 x batch / 512, weight decay 0.03).

    By default 1-d parameters and tokens are not decayed. `decay_all_parameters=True` decays every parameter, as the
    authors' `create_optimizer(args, model.parameters())` does: timm applies its bias/norm filter only when given the
    module (hustvl/WeakTr main.py:360).
    """
    if decay_all_parameters:
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        return torch.optim.AdamW(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if _no_weight_decay(name, parameter) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def build_seg_optimizer(
    model, learning_rate, encoder_lr_scale=0.1, momentum=0.9, weight_decay=0.0, nesterov=False
):
    """Step 2: SGD with momentum (paper: lr 1e-4, momentum 0.9, no weight decay); the encoder at `encoder_lr_scale`.

    The authors' `--optimizer sgd` is SGD with Nesterov momentum (OnlineRetraining/segm/optim/optim_factory.py:134-136):
    pass `nesterov=True` to match it.
    """
    encoder, decoder = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (encoder if name.startswith("weaktr.") else decoder).append(parameter)
    groups = [
        {"params": encoder, "lr": learning_rate * encoder_lr_scale},
        {"params": decoder, "lr": learning_rate},
    ]
    return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def build_scheduler(name, optimizer, num_training_steps, num_warmup_steps=0, min_learning_rate=0.0):
    """
    `"cosine"` (cosine with linear warm-up from 0, to 0), `"poly"` (polynomial decay, power 0.9, down to
    `min_learning_rate`) or `"constant"`, per update step.

    `"poly"` with `min_learning_rate` is the authors' step-2 schedule (OnlineRetraining/segm/optim/scheduler.py:24-31):
    lr = (base - min) (1 - t / T)^0.9 + min for the optimizer's default lr; every group is scaled by the same factor,
    so a group at 0.1 x base lr (the encoder) ends at 0.1 x min, as their per-iteration `lr_scale` does.
    """
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    if name == "poly":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps, num_training_steps, lr_end=min_learning_rate, power=0.9
        )
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"Unknown lr schedule {name!r}: use 'cosine', 'poly' or 'constant'.")


class UpdateStepCosineScheduler:
    """
    timm's `CosineLRScheduler` driven by optimizer updates: `step()` is called once per update of the global batch.

    - `per="epoch"` (the authors' step 1, hustvl/WeakTr main.py:363, 399): the lr changes only at epoch ends, where
      `scheduler.step(epoch)` is called with the index of the epoch that just finished, so epoch e trains at
      lr(max(e - 1, 0)) of a schedule with `t_initial=num_epochs`, `warmup_t=warmup_epochs` and no warm-up prefix.
    - `per="step"`: the lr changes every update; the cosine runs after the warm-up (`warmup_prefix=True`) over the
      remaining updates. With `warmup_lr_init=0` and `lr_min=0` this is transformers' cosine-with-warm-up.

    State (`state_dict` / `load_state_dict`) is the update count and timm's own state, so it resumes exactly.
    """

    def __init__(self, optimizer, *, num_training_steps, steps_per_epoch, num_epochs, warmup_epochs=0.0,
                 warmup_lr_init=0.0, lr_min=0.0, per="epoch"):  # fmt: skip
        from timm.scheduler import CosineLRScheduler

        if per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step', got {per!r}.")
        self.optimizer = optimizer
        self.per = per
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.num_updates = 0
        if per == "epoch":
            self.scheduler = CosineLRScheduler(
                optimizer, t_initial=num_epochs, lr_min=lr_min, warmup_t=int(warmup_epochs),
                warmup_lr_init=warmup_lr_init, cycle_limit=1, t_in_epochs=True,
            )  # fmt: skip
        else:
            warmup = min(int(warmup_epochs * self.steps_per_epoch), max(num_training_steps - 1, 0))
            self.scheduler = CosineLRScheduler(
                optimizer, t_initial=max(num_training_steps - warmup, 1), lr_min=lr_min, warmup_t=warmup,
                warmup_lr_init=warmup_lr_init, warmup_prefix=True, cycle_limit=1, t_in_epochs=False,
            )  # fmt: skip

    def step(self):
        self.num_updates += 1
        if self.per == "step":
            self.scheduler.step_update(self.num_updates)
        elif self.num_updates % self.steps_per_epoch == 0:
            self.scheduler.step(self.num_updates // self.steps_per_epoch - 1)

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"num_updates": self.num_updates, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.num_updates = state["num_updates"]
        self.scheduler.load_state_dict(state["scheduler"])
        # timm restores its bookkeeping only; put the lr of the restored position back into the optimizer.
        if self.per == "step":
            if self.num_updates:
                self.scheduler.step_update(self.num_updates)
        elif self.num_updates >= self.steps_per_epoch:
            self.scheduler.step(self.num_updates // self.steps_per_epoch - 1)


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


SAVED_FILE = "saved.json"  # written into each checkpoint last: its step and when it was saved


def _checkpoints_by_age(checkpoint_dir):
    """Finished `step_<n>` checkpoints, oldest first: by the time each was saved (so a checkpoint an earlier run left
    with a higher step never counts as newer), then by step for checkpoints without a record."""
    found = []
    for name in os.listdir(checkpoint_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(checkpoint_dir, name)
        if not match or not os.path.isdir(path):
            continue
        saved_at = -1
        record = os.path.join(path, SAVED_FILE)
        if os.path.isfile(record):
            with open(record, encoding="utf-8") as handle:
                saved_at = json.load(handle).get("time_ns", -1)
        found.append((saved_at, int(match.group(1)), name))
    return [name for _, _, name in sorted(found)]


def find_latest_checkpoint(checkpoint_dir):
    """The most recently saved finished checkpoint under `checkpoint_dir` (`step_<n>`), or None.

    Half-written checkpoints live under a temporary name until complete, so they are never picked.
    """
    if not os.path.isdir(checkpoint_dir):
        return None
    names = _checkpoints_by_age(checkpoint_dir)
    return os.path.join(checkpoint_dir, names[-1]) if names else None


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
        with open(os.path.join(temporary, SAVED_FILE), "w", encoding="utf-8") as handle:
            json.dump({"step": step, "time_ns": time.time_ns()}, handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit:
            _prune_checkpoints(checkpoint_dir, total_limit, keep=step)
    accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(checkpoint_dir, total_limit, keep):
    """Keep the checkpoint just written (`keep`) and the most recently saved others up to `total_limit` in all: a
    checkpoint of a higher step left by an earlier attempt never pushes out the current one."""
    others = [name for name in _checkpoints_by_age(checkpoint_dir) if name != f"step_{keep}"]
    for name in others[: max(len(others) - (total_limit - 1), 0)]:
        shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)


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
    Train `model` (already `accelerator.prepare`d with its optimiser and dataloader) for `max_train_steps` optimiser
    updates. `lr_scheduler.step()` is called once per update. A scheduler left out of `accelerator.prepare` thus
    counts updates of the global batch, the same on any number of processes (a prepared one is stepped once per
    process instead), and is registered for checkpointing here.

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
    # A scheduler that did not go through `accelerator.prepare` counts updates of the global batch (one `step()` per
    # update whatever the number of processes); checkpoints must carry it too.
    prepared = any(lr_scheduler is scheduler for scheduler in accelerator._schedulers)
    if not prepared and not any(obj is lr_scheduler for obj in accelerator._custom_objects):
        accelerator.register_for_checkpointing(lr_scheduler)
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
            if hasattr(batches, "set_epoch"):  # accelerate < 1.15 starts the new loader at epoch 0's shuffle
                batches.set_epoch(epoch)
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
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            # Once per optimizer update (an `accelerator.prepare`d scheduler also skips accumulation micro-steps).
            lr_scheduler.step()
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
    "UpdateStepCosineScheduler",
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
