"""
Can a model learn a synthetic configuration's classes from its image-level labels, apart from WeakTr? Train a small
CNN or a plain ViT of the demo encoder's size as a multi-label classifier on the same images the demo trains on.

    python examples/probe_shape_learning.py --model cnn --synthetic_config shape-only --seed 42
    python examples/probe_shape_learning.py --model vit --backbone demo --synthetic_config shape-only --seed 42

The images, their size, the number of classes and of training images, the step-1 augmentation ("light": random
resized crop at scale 0.5-1 and flip), batch, weight decay and the loss (multi-label soft margin, ln 2 = 0.693 at
chance) are the demo preset's, so a probe sees what step 1 sees. `--model vit` is timm's `VisionTransformer` with the
demo encoder's shape (patch 8, width 128, 4 layers, 4 heads), from random weights or the committed demo backbone
(`--backbone demo`, or a timm checkpoint file; `--patch_size 4` makes a finer patch grid, from random weights only;
`--stem conv` puts a convolutional stem in place of the patch projection: three 3 x 3 stride-2 convolutions with
batch norm and ReLU, 32-64-128 channels, then a 1 x 1 convolution to the width, the same 8 x 8 token grid; `--stem cnn`
puts the first three blocks of the CNN below there instead (six convolutions, three max-poolings), a hybrid ViT; both
from random weights only);
`--model cnn` is four blocks of two 3 x 3 convolutions with batch norm (32-64-128-128 channels, max pooling between
blocks) and global average pooling. Both train with AdamW and a one-cycle schedule (7% warm-up), one thread.

Every `--eval_every` epochs it prints the mean training loss of the epoch and, on the validation images (resized
only), the loss, the label accuracy (each class present / absent right, threshold at logit 0) and the exact-match
rate (every label of an image right); `--output_json` keeps them. What it found on the demo is in
docs/step2-diagnosis.md ("Why the encoder does not learn the shapes").
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from weaktr_hf.data import load_wsss_dataset
from weaktr_hf.data.collators import CAMCollator
from weaktr_hf.data.synthetic import SYNTHETIC_CONFIGURATIONS
from weaktr_hf.data.transforms import CAMTrainTransform
from weaktr_hf.recipes import DEMO_BACKBONE, PRESETS

DEMO = PRESETS["demo"]
STEM_PATCH_SIZE = 8  # `ConvStem` halves the input three times: one token per 8 x 8 pixels


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", choices=("cnn", "vit"), required=True)
    parser.add_argument("--synthetic_config", choices=sorted(SYNTHETIC_CONFIGURATIONS), default="shape-only")
    parser.add_argument("--seed", type=int, default=42, help="data and training seed (the demo's --seed)")
    parser.add_argument("--backbone", default="none",
                        help="--model vit: 'none' (random weights), 'demo' (the committed demo backbone) or a timm "
                             "checkpoint file")  # fmt: skip
    parser.add_argument("--patch_size", type=int, default=DEMO["patch_size"],
                        help="--model vit: patch size; other than the demo's 8 only from random weights")  # fmt: skip
    parser.add_argument("--stem", choices=("patch", "conv", "cnn"), default="patch",
                        help="--model vit: the tokens from the patch projection (the demo encoder's), a convolutional "
                             "stem or the CNN's first three blocks (random weights, patch 8 only)")  # fmt: skip
    parser.add_argument("--num_train_epochs", type=int, default=DEMO["num_train_epochs"])
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="peak lr; default 1e-3 (cnn) or the demo's step-1 2e-3 (vit)")  # fmt: skip
    parser.add_argument("--num_train", type=int, default=DEMO["synthetic_num_train"])
    parser.add_argument("--num_val", type=int, default=DEMO["synthetic_num_val"])
    parser.add_argument("--eval_every", type=int, default=5, help="epochs between evaluations (and the last one)")
    parser.add_argument("--output_json", default=None, help="write the settings and every evaluation here")
    args = parser.parse_args(argv)
    vit_only = args.backbone != "none" or args.patch_size != DEMO["patch_size"] or args.stem != "patch"
    if args.model == "cnn" and vit_only:
        parser.error("--backbone, --patch_size and --stem are for --model vit only.")
    if args.stem != "patch" and (args.backbone != "none" or args.patch_size != STEM_PATCH_SIZE):
        parser.error(f"--stem {args.stem}: the stem makes patch {STEM_PATCH_SIZE} tokens from random weights; leave "
                     "out --backbone and --patch_size.")  # fmt: skip
    if args.patch_size != DEMO["patch_size"] and args.backbone != "none":
        parser.error(f"--patch_size {args.patch_size}: backbones are patch {DEMO['patch_size']}; use --backbone none.")
    if args.patch_size < 1 or DEMO["cam_image_size"] % args.patch_size:
        parser.error(f"--patch_size must divide the input size {DEMO['cam_image_size']}, got {args.patch_size}.")
    for name in ("num_train_epochs", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.num_train < DEMO["total_train_batch_size"]:
        parser.error(f"--num_train must be at least the batch size, {DEMO['total_train_batch_size']}.")
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.model == "cnn" else DEMO["learning_rate"]
    return args


def build_cnn(num_classes):
    def block(inputs, outputs):
        return [
            nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
        ]  # fmt: skip

    layers = [*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2)]
    layers += [*block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


class ConvStem(nn.Module):
    """Tokens from convolutions, one per 8 x 8 pixels as the patch projection gives, then a 1 x 1 projection to `width`.
    "conv": three 3 x 3 stride-2 convolutions (batch norm, ReLU; 32-64-128 channels); "cnn": the first three blocks of
    `build_cnn` (two 3 x 3 convolutions each, max-pooling after each block), which makes the ViT a hybrid."""

    def __init__(self, kind, width, num_classes):
        super().__init__()
        if kind == "conv":
            layers, channels = [], 3
            for out in (32, 64, 128):
                layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
            features = nn.Sequential(*layers)
        elif kind == "cnn":
            cnn = build_cnn(num_classes)
            pools = [index for index, layer in enumerate(cnn) if isinstance(layer, nn.MaxPool2d)]
            features = cnn[: pools[2] + 1]  # up to the third pooling: 64 px -> 8 x 8, 128 channels
        else:
            raise ValueError(f"stem {kind!r}: choose 'conv' or 'cnn'.")
        self.layers = nn.Sequential(*features, nn.Conv2d(128, width, 1))

    def forward(self, pixel_values):
        return self.layers(pixel_values).flatten(2).transpose(1, 2)


def build_vit(num_classes, backbone, patch_size=DEMO["patch_size"], stem="patch"):
    """timm's ViT in the demo encoder's shape; weights from `backbone` ('none', 'demo' or a file), head left new;
    `stem="conv"` or `"cnn"` replaces the patch projection by `ConvStem` (random weights, patch 8)."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=DEMO["cam_image_size"], patch_size=patch_size, embed_dim=DEMO["hidden_size"],
        depth=DEMO["num_hidden_layers"], num_heads=DEMO["num_attention_heads"],
        mlp_ratio=DEMO["intermediate_size"] / DEMO["hidden_size"], num_classes=num_classes,
    )  # fmt: skip
    if stem != "patch":
        if backbone != "none" or patch_size != STEM_PATCH_SIZE:
            raise ValueError(f"stem={stem!r} makes patch {STEM_PATCH_SIZE} tokens from random weights, got backbone "
                             f"{backbone!r}, patch_size {patch_size}.")  # fmt: skip
        model.patch_embed = ConvStem(stem, DEMO["hidden_size"], num_classes)
    if backbone == "none":
        return model, None
    path = DEMO_BACKBONE if backbone == "demo" else backbone
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--backbone {backbone}: no file at {path}; pass 'none', 'demo' or a timm checkpoint.")
    state = {key: value for key, value in load_file(path).items() if not key.startswith("head.")}
    own = model.state_dict()
    mismatched = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
    if mismatched:
        raise ValueError(f"--backbone {path}: shapes differ from the demo encoder's for {mismatched[:4]}; it is "
                         "not a checkpoint of the demo's ViT shape.")  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"--backbone {path}: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    return model, path


def batches(examples, transform, num_classes, batch_size):
    """(pixel_values, multi-hot labels) batches, made by step 1's own collator."""
    collate = CAMCollator(num_classes)
    for start in range(0, len(examples), batch_size):
        batch = collate([transform(example) for example in examples[start : start + batch_size]])
        yield batch["pixel_values"], batch["labels"]


@torch.no_grad()
def evaluate(model, examples, transform, num_classes):
    model.eval()
    losses, correct, exact = [], 0, 0
    for pixel_values, targets in batches(examples, transform, num_classes, 64):
        logits = model(pixel_values)
        losses.append(F.multilabel_soft_margin_loss(logits, targets, reduction="sum").item())
        right = (logits > 0).float() == targets
        correct += right.sum().item()
        exact += right.all(dim=1).sum().item()
    model.train()
    return {
        "val_loss": sum(losses) / len(examples),
        "val_label_accuracy": correct / (len(examples) * num_classes),
        "val_exact_match": exact / len(examples),
    }


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return probe(args)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller that goes on in the same process


def probe(args):
    torch.manual_seed(args.seed)
    num_classes = DEMO["synthetic_num_classes"]
    dataset = load_wsss_dataset(
        "synthetic", num_classes=num_classes, image_size=DEMO["synthetic_image_size"], num_train=args.num_train,
        num_val=args.num_val, seed=args.seed, **SYNTHETIC_CONFIGURATIONS[args.synthetic_config],
    )  # fmt: skip
    train, val = list(dataset["train"]), list(dataset["val"])
    augment = CAMTrainTransform(DEMO["cam_image_size"], augment=DEMO["cam_augment"])
    resize = CAMTrainTransform(DEMO["cam_image_size"], augment="none")
    if args.model == "cnn":
        model, backbone = build_cnn(num_classes), None
    else:
        model, backbone = build_vit(num_classes, args.backbone, args.patch_size, args.stem)
    batch_size = DEMO["total_train_batch_size"]
    steps_per_epoch = len(train) // batch_size  # the last partial batch is dropped
    total_steps = args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=DEMO["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.learning_rate, total_steps=total_steps, pct_start=0.07
    )
    settings = {**vars(args), "backbone": backbone, "steps": total_steps}
    print(json.dumps(settings))
    history, started = [], time.time()
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.num_train_epochs + 1):
        order = torch.randperm(len(train), generator=generator)[: steps_per_epoch * batch_size].tolist()
        losses = []
        for pixel_values, targets in batches([train[i] for i in order], augment, num_classes, batch_size):
            loss = F.multilabel_soft_margin_loss(model(pixel_values), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the training loss became {losses[-1]} in epoch {epoch}; lower --learning_rate.")
        if epoch % args.eval_every == 0 or epoch == args.num_train_epochs:
            row = {"epoch": epoch, "train_loss": sum(losses) / len(losses), **evaluate(model, val, resize, num_classes)}
            row["seconds"] = round(time.time() - started, 1)
            history.append(row)
            print(" ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in row.items()), flush=True)  # fmt: skip
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as handle:
            json.dump({"settings": settings, "history": history}, handle, indent=2)
    return history


if __name__ == "__main__":
    main()
