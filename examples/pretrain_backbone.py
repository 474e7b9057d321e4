#!/usr/bin/env python
"""Pre-train the demo's ViT without natural images or downloads: formula-driven supervised pre-training on fractals.

    python examples/pretrain_backbone.py --output_dir src/weaktr_hf/demo_backbone      # the committed demo backbone
    accelerate launch examples/train.py --backbone src/weaktr_hf/demo_backbone/model.safetensors

The data follow FractalDB (Kataoka et al., ACCV 2020): each class is a random iterated function system (IFS) of 2-4
contractive affine maps, and an image of the class is a rendering of its attractor. Two things differ from FractalDB,
both so that the patch tokens and the attention, which WeakTr's CAMs are read from, learn something:

- an image holds 1-3 fractals of different classes (random colour, size, position, flip) on a random gradient
  background with noise, and the class token learns which classes are present (a softmax over the classes against
  the present ones, equally weighted);
- every fractal's pixels are known, so each 8 x 8 patch also gets a target: the fraction of its pixels per class
  (background included). A linear head on the patch tokens learns it beside the class-token head.

`--data contours` draws the classes as filled outlines instead, in the spirit of the radial contour database
(Kataoka et al., CVPR 2022): each class is a regular polygon of 3-8 sides or a circle, bent by 1-2 random harmonics,
some squeezed or hollow; an instance is the filled outline at a random size, position, rotation and flip, in one
colour or (a share `--textured` of them) a random texture unrelated to the class, so only the outline tells the class.
It was written to give the demo a backbone that sees shape; measured in docs/step2-diagnosis.md ("`shape-only`: what
else was tried"): it does not close `shape-only`, and lifts every stage on `default`. The committed backbone is the
fractal one.

Everything is drawn from `--seed`: the IFS or contour classes, and batch `i` from `(seed, i)`, so a run is identical
for a seed (on one CPU type, with one intra-op thread) and resuming from a checkpoint gives the same weights as an
unbroken run. `--num_workers N` draws the batches in N processes (the same batches, so the same weights) and
`--device cuda` trains on a GPU, for far longer pre-training than a CPU allows. Drawing a batch of 64 contour images
takes about 0.07 s of one CPU core, far more than a GPU step of this small model, so give a GPU run the machine's
cores as workers. On a GPU the weights hold for a seed only up to its kernels' floating-point order.
The output folder gets `model.safetensors` (a timm `VisionTransformer` state dict, class-token head included, which
`load_timm_backbone` drops), `pretraining.json` (settings and measured accuracy) and `README.md` (a short card).
"""

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

# Mean and std the WeakTr image processor normalises with (ImageNet's), so the backbone sees the same inputs.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CLOUD_POINTS = 40_000  # points of each class's attractor; an instance draws a random subset of them
CONTOUR_ANGLES = 720  # directions at which a contour class stores its radius
DATA = ("contours", "fractals")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output_dir", default="outputs/demo-backbone")
    add("--seed", type=int, default=0)
    add("--data", choices=DATA, default="fractals", help="formula-driven classes: filled contours or IFS fractals")
    add("--num_classes", type=int, default=32, help="contour or fractal classes")
    add("--textured", type=float, default=0.5, help="contours: share of objects filled with a texture, not one colour")
    add("--image_size", type=int, default=64)
    add("--max_objects", type=int, default=3, help="objects per image: 1 to this many, of different classes")
    # The demo's ViT (examples/train.py, preset demo).
    add("--patch_size", type=int, default=8)
    add("--hidden_size", type=int, default=128)
    add("--num_hidden_layers", type=int, default=4)
    add("--num_attention_heads", type=int, default=4)
    add("--intermediate_size", type=int, default=512)
    # Optimisation: a fixed number of steps, so the result does not depend on the machine's speed.
    add("--max_train_steps", type=int, default=1200)
    add("--batch_size", type=int, default=64)
    add("--learning_rate", type=float, default=1e-3)
    add("--weight_decay", type=float, default=0.05)
    add("--warmup_steps", type=int, default=200)
    add("--patch_loss_weight", type=float, default=1.0, help="weight of the per-patch loss (0: image labels only)")
    add("--num_val", type=int, default=512, help="held-out images scored at the end and every --eval_steps")
    add("--eval_steps", type=int, default=200)
    add("--checkpointing_steps", type=int, default=200, help="save a resumable state every N steps")
    add("--num_threads", type=int, default=1)
    add("--device", default="auto", help="'auto' (a GPU where torch sees one, else the CPU), 'cpu', 'cuda', ...")
    add("--num_workers", type=int, default=0,
        help="processes that draw the batches (0: the training process); batch i is the same whatever the count")
    args = parser.parse_args(argv)
    for name in ("num_classes", "max_train_steps", "batch_size", "num_val", "eval_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be at least 0, got {args.num_workers}.")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no GPU here; use --device cpu (or auto).")
    if args.image_size % args.patch_size:
        parser.error(f"--image_size ({args.image_size}) must be a multiple of --patch_size ({args.patch_size}).")
    if not 1 <= args.max_objects <= args.num_classes:
        parser.error(f"--max_objects must be in 1..--num_classes, got {args.max_objects}.")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Formula-driven data
# ---------------------------------------------------------------------------------------------------------------------


def iterate_ifs(maps, probabilities, rng, num_points, iterations=20, burn_in=8):
    """Points of an IFS attractor by the chaos game, run on `num_points` walkers at once."""
    points = rng.uniform(-1, 1, (num_points, 2))
    kept = []
    for step in range(iterations):
        choice = rng.choice(len(maps), size=num_points, p=probabilities)
        points = np.einsum("nij,nj->ni", maps[choice, :, :2], points) + maps[choice, :, 2]
        if step >= burn_in:
            kept.append(points)
    return np.concatenate(kept)


def sample_ifs_class(rng, min_fill=0.12):
    """A random contractive IFS whose attractor fills at least `min_fill` of its bounding box on a 32 x 32 grid (the
    FractalDB filling-rate filter), returned as its attractor normalised to [0, 1]^2."""
    while True:
        maps = rng.uniform(-1, 1, (int(rng.integers(2, 5)), 2, 3))
        linear = maps[:, :, :2]
        if np.linalg.svd(linear, compute_uv=False)[:, 0].max() >= 1:
            continue
        determinants = np.abs(np.linalg.det(linear))
        if determinants.sum() < 1e-3:
            continue
        probabilities = determinants / determinants.sum()
        points = iterate_ifs(maps, probabilities, rng, num_points=CLOUD_POINTS // 12, iterations=20)
        low, high = points.min(0), points.max(0)
        span = (high - low).max()
        if not np.isfinite(points).all() or span < 1e-3:
            continue
        points = (points - low) / span
        cells = np.unique((points * 31).astype(int), axis=0)
        if len(cells) / 1024 >= min_fill:
            return points.astype(np.float32)


def sample_contour_class(rng, angles=CONTOUR_ANGLES):
    """A random closed contour (in the spirit of the radial contour database, Kataoka et al., CVPR 2022): its radius
    at each of `angles` directions, max 1, and the relative radius of a hole along the same contour (0: none).

    The outline is a regular polygon of 3-8 sides (half the classes) or a circle, bent by 1-2 random harmonics of
    orders 2-7 (amplitude 0.05-0.25 each), for half the classes squeezed along one axis (aspect 0.35-1), and for a
    quarter of them hollow."""
    theta = np.linspace(0, 2 * np.pi, angles, endpoint=False)
    if rng.random() < 0.5:
        sides = int(rng.integers(3, 9))
        sector = (theta + rng.uniform(0, 2 * np.pi)) % (2 * np.pi / sides) - np.pi / sides
        radius = np.cos(np.pi / sides) / np.cos(sector)
    else:
        radius = np.ones_like(theta)
    for harmonic in rng.choice(np.arange(2, 8), size=int(rng.integers(1, 3)), replace=False):
        radius = radius + rng.uniform(0.05, 0.25) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    # Squeeze along x: the radius in direction theta of the squeezed outline, read back on the same directions.
    aspect = rng.uniform(0.35, 1.0) if rng.random() < 0.5 else 1.0
    x, y = radius * np.cos(theta) * aspect, radius * np.sin(theta)
    order = np.argsort(np.arctan2(y, x) % (2 * np.pi))
    squeezed = np.interp(theta, (np.arctan2(y, x) % (2 * np.pi))[order], np.hypot(x, y)[order], period=2 * np.pi)
    squeezed = np.maximum(squeezed, 0.25 * squeezed.max())
    hole = rng.uniform(0.35, 0.6) if rng.random() < 0.25 else 0.0
    return {"radius": (squeezed / squeezed.max()).astype(np.float32), "hole": np.float32(hole)}


def make_classes(seed, num_classes, data="fractals"):
    """The `num_classes` classes of a seed: IFS attractors (`data="fractals"`) or contours (`"contours"`)."""
    rng = np.random.default_rng([seed, 0])
    sample = sample_ifs_class if data == "fractals" else sample_contour_class
    return [sample(rng) for _ in range(num_classes)]


def background(rng, size):
    """A random vertical or horizontal colour gradient, (size, size, 3) floats in 0..1."""
    top, bottom = rng.uniform(0, 1, (2, 3)).astype(np.float32)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).copy()
    return image.transpose(1, 0, 2).copy() if rng.random() < 0.5 else image


def visible_colour(rng, behind):
    """A random colour that differs from the mean colour `behind` by at least 0.35 in one channel."""
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    if np.abs(colour - behind).max() < 0.35:
        colour = np.where(behind > 0.5, 0.0, 1.0).astype(np.float32)
    return colour


def render_image(rng, classes, image_size, max_objects, data="fractals", textured=0.5):
    """One image (H, W, 3 float in 0..1) and its label map (0 background, k + 1 class k)."""
    if data == "fractals":
        image, labels = render_fractals(rng, classes, image_size, max_objects)
    else:
        image, labels = render_contours(rng, classes, image_size, max_objects, textured)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), labels


def render_fractals(rng, clouds, size, max_objects):
    image = background(rng, size)
    labels = np.zeros((size, size), dtype=np.int64)
    count = int(rng.integers(1, max_objects + 1))
    for kind in rng.choice(len(clouds), size=count, replace=False):
        cloud = clouds[kind]
        points = cloud[rng.integers(0, len(cloud), len(cloud) // 4)]
        if rng.random() < 0.5:
            points = points * np.array([-1, 1], dtype=np.float32) + np.array([1, 0], dtype=np.float32)
        scale = rng.uniform(0.35, 0.8) * size
        offset = rng.uniform(0, size - scale, 2)
        pixels = np.clip((points * scale + offset).astype(int), 0, size - 1)
        # keep every fractal visible against what is behind it
        colour = visible_colour(rng, image[pixels[::16, 1], pixels[::16, 0]].mean(0))
        image[pixels[:, 1], pixels[:, 0]] = colour
        labels[pixels[:, 1], pixels[:, 0]] = kind + 1
    return image, labels


def texture(rng, yy, xx):
    """A random two-colour pattern (stripes at any angle, checkerboard, dots, speckle or none), as booleans: drawn
    apart from the class, so only the outline tells a contour's class."""
    kind = int(rng.integers(0, 5))
    period = rng.uniform(4, 8)
    angle = rng.uniform(0, np.pi)
    along = (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 1)
    across = (-xx * np.sin(angle) + yy * np.cos(angle)) / period + rng.uniform(0, 1)
    if kind == 0:
        return (along % 1) < 0.5
    if kind == 1:
        return (np.floor(along) + np.floor(across)) % 2 == 0
    if kind == 2:
        return np.hypot(along % 1 - 0.5, across % 1 - 0.5) < 0.3
    if kind == 3:
        return rng.random(yy.shape) < 0.5
    return np.zeros(yy.shape, dtype=bool)


def render_contours(rng, contours, size, max_objects, textured):
    """Filled contours of different classes at random size (0.3-0.75 of the side), position, rotation and flip,
    a share `textured` of them with a random texture in two random colours, the others in one random colour; later
    ones occlude earlier ones."""
    image = background(rng, size)
    labels = np.zeros((size, size), dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    count = int(rng.integers(1, max_objects + 1))
    for kind in rng.choice(len(contours), size=count, replace=False):
        contour = contours[kind]
        radius = rng.uniform(0.15, 0.375) * size
        centre = rng.uniform(0.15 * size, 0.85 * size, 2)
        rotation = rng.uniform(0, 2 * np.pi)
        u, v = (xx - centre[0]) / radius, (yy - centre[1]) / radius
        if rng.random() < 0.5:
            u = -u
        distance = np.hypot(u, v)
        direction = ((np.arctan2(v, u) + rotation) % (2 * np.pi)) / (2 * np.pi) * len(contour["radius"])
        outline = contour["radius"][direction.astype(int) % len(contour["radius"])]
        inside = (distance <= outline) & (distance >= contour["hole"] * outline)
        if not inside.any():
            continue
        first = visible_colour(rng, image[inside].mean(0))
        if rng.random() < textured:
            second = visible_colour(rng, first)
            image[inside] = np.where(texture(rng, yy, xx)[inside][:, None], first, second)
        else:
            image[inside] = first
        labels[inside] = kind + 1
    return image, labels


class TrainingBatches(torch.utils.data.Dataset):
    """Batch `i` of the training stream is `make_batch(seed, i, ...)`: the same batch whichever process draws it, so
    `--num_workers` changes the speed, never the weights."""

    def __init__(self, seed, classes, args):
        self.seed, self.classes, self.args = seed, classes, args

    def __len__(self):
        return self.args.max_train_steps

    def __getitem__(self, index):
        return make_batch(self.seed, index, self.classes, self.args)


def make_batch(seed, index, classes, args):
    """Batch `index` of the stream for `seed`: normalised pixels, multi-hot labels, per-patch class fractions."""
    rng = np.random.default_rng([seed, 1, index])
    images, label_maps = zip(*(render_image(rng, classes, args.image_size, args.max_objects, args.data, args.textured)
                               for _ in range(args.batch_size)))  # fmt: skip
    pixels = torch.from_numpy((np.stack(images) - IMAGE_MEAN) / IMAGE_STD).permute(0, 3, 1, 2).contiguous()
    label_maps = np.stack(label_maps)
    num_labels, patch, side = len(classes) + 1, args.patch_size, args.image_size // args.patch_size
    rows, cols = np.mgrid[0 : args.image_size, 0 : args.image_size] // patch
    slot = (np.arange(len(label_maps))[:, None, None] * side * side + rows * side + cols) * num_labels + label_maps
    counts = np.bincount(slot.ravel(), minlength=len(label_maps) * side * side * num_labels)
    patch_targets = torch.from_numpy(counts.reshape(len(label_maps), side * side, num_labels) / patch**2).float()
    image_labels = torch.from_numpy(counts.reshape(len(label_maps), -1, num_labels).sum(1)[:, 1:] > 0).float()
    return pixels, image_labels, patch_targets


# ---------------------------------------------------------------------------------------------------------------------
# Model, losses, evaluation
# ---------------------------------------------------------------------------------------------------------------------


def build_model(args):
    from timm.models.vision_transformer import VisionTransformer

    backbone = VisionTransformer(
        img_size=args.image_size, patch_size=args.patch_size, embed_dim=args.hidden_size, depth=args.num_hidden_layers,
        num_heads=args.num_attention_heads, mlp_ratio=args.intermediate_size / args.hidden_size,
        num_classes=args.num_classes,
    )  # fmt: skip
    patch_head = torch.nn.Linear(args.hidden_size, args.num_classes + 1)
    return backbone, patch_head


def forward(backbone, patch_head, pixels):
    tokens = backbone.forward_features(pixels)
    return backbone.forward_head(tokens), patch_head(tokens[:, backbone.num_prefix_tokens :])


def losses(backbone, patch_head, batch, patch_loss_weight):
    pixels, image_labels, patch_targets = batch
    image_logits, patch_logits = forward(backbone, patch_head, pixels)
    # Softmax cross-entropy against the present classes, equally weighted: with 1-3 positives of K classes it learns
    # far faster than per-class sigmoids, which sit at the label prior for hundreds of steps.
    image_loss = -(image_labels / image_labels.sum(-1, keepdim=True) * F.log_softmax(image_logits, -1)).sum(-1).mean()
    patch_loss = -(patch_targets * F.log_softmax(patch_logits, dim=-1)).sum(-1).mean()
    return image_loss + patch_loss_weight * patch_loss, image_loss, patch_loss


@torch.no_grad()
def evaluate(backbone, patch_head, val_batches):
    """Image-level top-k accuracy (k = objects in the image: the share of present classes among the k highest
    scores) and the accuracy of the patch head on patches that are mostly one fractal."""
    backbone.eval()
    found = present = patch_correct = patch_count = 0
    for pixels, image_labels, patch_targets in val_batches:
        image_logits, patch_logits = forward(backbone, patch_head, pixels)
        for logits, labels in zip(image_logits, image_labels):
            k = int(labels.sum())
            found += int(labels[logits.topk(k).indices].sum())
            present += k
        share, target = patch_targets[..., 1:].max(-1)
        mostly_object = share > 0.25  # rendered fractals are sparse: a quarter of a patch is a dense part of one
        patch_correct += int((patch_logits.argmax(-1) == target + 1)[mostly_object].sum())
        patch_count += int(mostly_object.sum())
    backbone.train()
    return {"image_topk_accuracy": found / max(present, 1), "patch_accuracy": patch_correct / max(patch_count, 1)}


def learning_rate(step, args):
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(args.max_train_steps - args.warmup_steps, 1)
    return args.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and outputs
# ---------------------------------------------------------------------------------------------------------------------


def save_state(path, backbone, patch_head, optimizer, step, elapsed, history):
    temporary = path + ".tmp"
    torch.save({"backbone": backbone.state_dict(), "patch_head": patch_head.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "history": history},
               temporary)  # fmt: skip
    os.replace(temporary, path)


def chance_topk(settings):
    """Expected image-level top-k accuracy of random scores: k of K classes drawn, k uniform in 1..max_objects."""
    return (1 + settings["max_objects"]) / 2 / settings["num_classes"]


def write_card(output_dir, record):
    settings, final = record["settings"], record["final"]
    contours = settings.get("data", "fractals") == "contours"
    what = "contours" if contours else "fractals"
    data = (f"{settings['num_classes']} random contour classes (regular polygons or circles bent by 1-2 random "
            "harmonics, some squeezed or hollow, in the spirit of the radial contour database); "
            f"1-{settings['max_objects']} filled contours of different classes per image, random size / position / "
            f"rotation / flip, {settings.get('textured', 0.5):.0%} of them with a random texture (stripes, "
            "checkerboard, dots, speckle or plain) in two random colours and the others in one, so only the outline "
            "tells the class,"
            if contours else
            f"{settings['num_classes']} random IFS fractal classes (FractalDB-style, filling rate >= 0.12); "
            f"1-{settings['max_objects']} fractals of different classes per image, random colour / size / position / "
            "flip,")  # fmt: skip
    card = "\n".join([
        f"# Demo backbone: a ViT pre-trained on formula-driven {what}",
        "",
        f"A timm `VisionTransformer` (patch {settings['patch_size']}, width {settings['hidden_size']}, depth "
        f"{settings['num_hidden_layers']}, {settings['num_attention_heads']} heads, {settings['image_size']} px) for "
        "the offline demo: `accelerate launch examples/train.py` loads it as its `--backbone`. It saw no natural image "
        "and needed no download. Made by `examples/pretrain_backbone.py`.",
        "",
        f"- **Data**: {data} on gradient backgrounds with noise; generated on the fly from seed {settings['seed']} "
        f"({record['images_seen']:,} images seen).",
        "- **Targets**: the present classes on the class token (softmax cross-entropy against them, equally weighted) "
        "and each patch's class fractions (background included) on a linear patch head. The patch head is not saved; "
        "the class-token head is, and `load_timm_backbone` drops it.",
        f"- **Training**: {settings['max_train_steps']:,} steps of batch {settings['batch_size']}, AdamW lr "
        f"{settings['learning_rate']} (warm-up {settings['warmup_steps']} steps, cosine), weight decay "
        f"{settings['weight_decay']}, on {settings.get('device', 'cpu')} with {settings['num_threads']} intra-op "
        "thread(s).",
        f"- **Time**: {record['wall_seconds'] / 60:.1f} min wall on {record['machine']}.",
        f"- **Pre-training accuracy** on {settings['num_val']} held-out images: image-level top-k "
        f"{final['image_topk_accuracy']:.1%} (chance {chance_topk(settings):.1%}); patch head "
        f"{final['patch_accuracy']:.1%} on patches mostly covered by one {what[:-1]} (chance "
        f"{1 / settings['num_classes']:.1%}). Every {settings['eval_steps']} steps: "
        + ", ".join(f"{entry['image_topk_accuracy']:.1%}" for entry in record["history"]) + " (image level).",
        "",
        "Reproduce (identical weights for the same seed on the same CPU type with one thread):",
        "",
        f"    python examples/pretrain_backbone.py --output_dir {record['output_dir']} --data "
        f"{settings.get('data', 'fractals')} --seed {settings['seed']} --max_train_steps {settings['max_train_steps']} "
        f"--num_classes {settings['num_classes']}"
        + (f" --textured {settings.get('textured', 0.5)}" if contours else ""),
        "",
    ])  # fmt: skip
    with open(os.path.join(output_dir, "README.md"), "w") as handle:
        handle.write(card)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    state_path = os.path.join(args.output_dir, "pretraining_state.pt")

    classes = make_classes(args.seed, args.num_classes, args.data)
    device = torch.device(args.device)
    # Held-out batches from a stream no training batch comes from, moved to the device once.
    val_batches = [tuple(tensor.to(device) for tensor in make_batch(args.seed + 1_000_003, i, classes, args))
                   for i in range(math.ceil(args.num_val / args.batch_size))]  # fmt: skip
    backbone, patch_head = (module.to(device) for module in build_model(args))
    parameters = list(backbone.parameters()) + list(patch_head.parameters())
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate)  # fmt: skip
    start, elapsed, history = 0, 0.0, []
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location=device, weights_only=True)
        backbone.load_state_dict(state["backbone"])
        patch_head.load_state_dict(state["patch_head"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"Resuming from step {start} ({state_path}).", flush=True)

    backbone.train()
    started = time.time() - elapsed
    stream = torch.utils.data.DataLoader(
        TrainingBatches(args.seed, classes, args), batch_size=None, sampler=range(start, args.max_train_steps),
        num_workers=args.num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    progress = tqdm(stream, initial=start, total=args.max_train_steps, desc="pre-training")
    for step, batch in enumerate(progress, start):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        batch = tuple(tensor.to(device, non_blocking=True) for tensor in batch)
        loss, image_loss, patch_loss = losses(backbone, patch_head, batch, args.patch_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % 10 == 0 or done == args.max_train_steps:  # reading a loss waits for a GPU: not every step
            progress.set_postfix(image_loss=f"{image_loss.item():.3f}", patch_loss=f"{patch_loss.item():.3f}")
        if done % args.eval_steps == 0 or done == args.max_train_steps:
            scores = evaluate(backbone, patch_head, val_batches)
            history.append({"step": done, "seconds": round(time.time() - started, 1), **scores})
            progress.write(json.dumps(history[-1]))
        if done % args.checkpointing_steps == 0 and done < args.max_train_steps:
            save_state(state_path, backbone, patch_head, optimizer, done, time.time() - started, history)

    wall = time.time() - started
    save_file({key: value.cpu().contiguous() for key, value in backbone.state_dict().items()},
              os.path.join(args.output_dir, "model.safetensors"), metadata={"format": "pt", "layout": "timm"})
    record = {
        "settings": vars(args), "final": history[-1], "history": history, "wall_seconds": round(wall, 1),
        "images_seen": args.max_train_steps * args.batch_size, "output_dir": args.output_dir,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    }  # fmt: skip
    with open(os.path.join(args.output_dir, "pretraining.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    write_card(args.output_dir, record)
    if os.path.isfile(state_path):
        os.remove(state_path)
    print(f"Saved {args.output_dir}/model.safetensors: {json.dumps(history[-1])}, {wall / 60:.1f} min", flush=True)
    return record


if __name__ == "__main__":
    main()
