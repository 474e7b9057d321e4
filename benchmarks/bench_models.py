"""Speed and peak memory of both WeakTr models against timm baselines on the same weights and inputs.

Every figure is a ratio against a baseline measured in the same run: the callables of one case are warmed up, then
timed in interleaved rounds (the order rotates each round, so drift in machine load hits all of them alike), and the
median of the rounds is reported (the ratio of the fastest rounds too, as a check against load spikes). Peak memory
is measured separately (see `measure_peaks`). Sections:

- `step1`: `WeakTrForCAM` forward (20 VOC class tokens, and 1) against timm's `deit_small_patch16_224` with eager
  attention, with 1 [CLS] token and with 19 extra register tokens (the same 20 prefix tokens as ours);
- `step2`: `WeakTrForSemanticSegmentation` forward at 480x480 against the floor: timm's `forward_features` (SDPA
  attention) followed by our decoder (`model.decoder`);
- `train`: one training step (forward, backward, AdamW) of each model against timm with a linear head and a
  multi-label / per-pixel cross-entropy loss, and for step 2 against timm + our decoder + our loss;
- `cam`: `weaktr_hf.inference.generate_cams` on one 500x375 image at scales 1.0 / 1.2 with flips, against the four
  bare forward passes it makes;
- `compile` (only with `--compile`): `torch.compile` against eager for both models' forward.

Run from the repository root: `PYTHONPATH=src python benchmarks/bench_models.py` (see benchmarks/README.md).
"""

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

SECTIONS = ("step1", "step2", "backbones", "train", "cam", "compile")
DEFAULT_SECTIONS = ("step1", "step2", "backbones", "train", "cam")
TIMM_MODEL = "deit_small_patch16_224"
# The authors' step-2 DINOv2-S / EVA-02-S encoders as timm builds them when configured like the authors (patch 16,
# 480 crop, LayerNorm eps 1e-5, EVA's final norm on all tokens).
TIMM_BACKBONES = {
    "dinov2": ("vit_small_patch14_dinov2", {}),
    "eva02": ("eva02_small_patch14_224", {"global_pool": "token", "use_fc_norm": False}),
}
# Backbones past the paper's, built with WeakTrForSemanticSegmentation.from_timm_backbone (config read from timm):
# key -> (label, timm name). Same 480x480 step-2 comparison as TIMM_BACKBONES.
TIMM_FAMILIES = {
    "dinov3_s": ("DINOv3-S", "vit_small_patch16_dinov3"),
    "dinov3_b": ("DINOv3-B", "vit_base_patch16_dinov3_qkvb"),
}
# One full-depth base-size encoder per family for the parity check (`family_parity`), at a square and a non-square
# input; the 14-px families use 16-px patches at 320x480 (14 does not divide it), as the authors' step 2.
FULL_DEPTH_PARITY = ("vit_base_patch16_dinov3_qkvb", "vit_base_patch14_reg4_dinov2", "eva02_base_patch14_224",
                     "deit3_base_patch16_224")  # fmt: skip
PARITY_SIZES = ((224, 224), (320, 480))
CAM_IMAGE_SIZE = (375, 500)  # (height, width) of a typical VOC image
CAM_SCALES = (1.0, 1.2)  # VOC's CAM-generation scales
MIB = 1024 * 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda.")
    parser.add_argument(
        "--dtypes", default=None,
        help="Comma-separated float32,bfloat16. Default: float32 on CPU, float32,bfloat16 on a GPU that supports bf16.",
    )  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="Add bfloat16 on CPU (slow without native bf16 units).")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"Comma-separated of {SECTIONS}.")
    parser.add_argument("--compile", action="store_true", help="Add the torch.compile section (minutes on a CPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds per case; the median is reported.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed calls of each callable before timing.")
    parser.add_argument("--step1-cases", default="224x1,224x8,448x1,448x8", help="Step-1 forward cases, SIZExBATCH.")
    parser.add_argument("--step2-batches", default="1,4", help="Step-2 forward batch sizes at 480x480.")
    parser.add_argument("--backbone-batches", default="1,4", help="Step-2 batch sizes at 480 of the backbones section.")
    parser.add_argument(
        "--backbones", default=",".join(list(TIMM_BACKBONES) + list(TIMM_FAMILIES)),
        help=f"Comma-separated encoders of the backbones section, of {list(TIMM_BACKBONES) + list(TIMM_FAMILIES)}; "
        "with a DINOv3 one the full-depth base parity of every family runs too.",
    )  # fmt: skip
    parser.add_argument("--train-step1", default="224x8", help="Step-1 training case, SIZExBATCH.")
    parser.add_argument("--train-step2", default="480x2", help="Step-2 training case, SIZExBATCH.")
    parser.add_argument("--compile-cases", default="step1:224x8,step2:480x4", help="Cases of the compile section.")
    parser.add_argument("--no-memory", action="store_true", help="Skip the peak-memory measurements.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument(
        "--timer", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time (default). cpu: this process's CPU time, steadier on a machine shared with other "
        "jobs; use it with --threads 1, since idle-waiting threads would count too.",
    )  # fmt: skip
    parser.add_argument("--output", default="benchmarks/results.json", help="Where to write the JSON results.")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: JSON list of case specs
    args = parser.parse_args(argv)

    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}.")
    if args.compile and "compile" not in sections:
        sections += ("compile",)
    args.sections = sections
    args.backbones = tuple(name.strip() for name in args.backbones.split(",") if name.strip())
    unknown = [name for name in args.backbones if name not in TIMM_BACKBONES and name not in TIMM_FAMILIES]
    if unknown:
        parser.error(f"unknown backbone(s) {unknown}; choose from {list(TIMM_BACKBONES) + list(TIMM_FAMILIES)}.")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False; run on CPU (the default).")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}.")
    if args.dtypes is None:
        dtypes = ["float32"]
        if args.device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtypes.append("bfloat16")
        if args.bf16 and "bfloat16" not in dtypes:
            dtypes.append("bfloat16")
        args.dtypes = dtypes
    else:
        args.dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
        bad = [name for name in args.dtypes if name not in ("float32", "bfloat16")]
        if bad:
            parser.error(f"--dtypes accepts float32 and bfloat16, got {bad}.")
    return args


def parse_size_batch(text):
    """'448x8' -> (448, 8)."""
    try:
        size, batch = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"Expected SIZExBATCH such as 448x8, got {text!r}.") from None
    return size, batch


def plan_cases(args):
    """The list of case specs (plain dicts, so the memory worker can rebuild them) in run order."""
    specs = []
    for dtype in args.dtypes:
        if "step1" in args.sections:
            for text in args.step1_cases.split(","):
                size, batch = parse_size_batch(text)
                specs.append({"section": "step1", "size": size, "batch": batch, "dtype": dtype})
        if "step2" in args.sections:
            for batch in args.step2_batches.split(","):
                specs.append({"section": "step2", "size": 480, "batch": int(batch), "dtype": dtype})
        if "backbones" in args.sections:
            for variant in args.backbones:
                for batch in args.backbone_batches.split(","):
                    specs.append({"section": "backbones", "variant": variant, "size": 480, "batch": int(batch),
                                  "dtype": dtype})  # fmt: skip
        if "train" in args.sections:
            size, batch = parse_size_batch(args.train_step1)
            specs.append({"section": "train", "model": "step1", "size": size, "batch": batch, "dtype": dtype})
            size, batch = parse_size_batch(args.train_step2)
            specs.append({"section": "train", "model": "step2", "size": size, "batch": batch, "dtype": dtype})
        if "cam" in args.sections:
            specs.append({"section": "cam", "dtype": dtype})
        if "compile" in args.sections:
            for text in args.compile_cases.split(","):
                model, case = text.split(":")
                size, batch = parse_size_batch(case)
                specs.append({"section": "compile", "model": model, "size": size, "batch": batch, "dtype": dtype})
    return specs


# ---------------------------------------------------------------------------------------------------------------------
# Models on shared weights
# ---------------------------------------------------------------------------------------------------------------------


def set_timm_attention(model, fused):
    """Pick timm's attention path per module: fused = F.scaled_dot_product_attention, else eager softmax."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


class ModelZoo:
    """Builds each model once, on weights shared through `weaktr_hf.load_timm_backbone`.

    Step 1: a timm DeiT-S (random init, seed 0) is copied into `WeakTrForCAM` with 20 and 1 class tokens; a second
    timm DeiT-S with 19 register tokens gets the same weights, its [CLS] + registers equal to our 20 class tokens, so it
    computes exactly our encoder. Step 2: a timm DeiT-S built for 480x480 is copied into the segmenter's encoder.
    """

    def __init__(self, device, dtype):
        import timm

        from weaktr_hf import WeakTrConfig, WeakTrForCAM, WeakTrForSemanticSegmentation, load_timm_backbone
        from weaktr_hf.labels import VOC_CLASSES, foreground_id2label, segmentation_id2label

        self.device, self.dtype = device, dtype
        self._cache = {}
        self._timm, self._load = timm, load_timm_backbone
        self._classes = (WeakTrConfig, WeakTrForCAM, WeakTrForSemanticSegmentation)
        self.cam_id2label = foreground_id2label(VOC_CLASSES)
        self.seg_id2label = segmentation_id2label(VOC_CLASSES)

    def get(self, name):
        if name not in self._cache:
            torch.manual_seed(0)
            kind, _, family = name.partition("_")
            builder = getattr(self, f"_build_{name}", None)
            model = builder() if builder is not None else getattr(self, f"_build_{kind}_family")(family)
            self._cache[name] = model.to(self.device).eval()
        return self._cache[name]

    def cast(self, model):
        """A copy of `model` in the benchmark dtype (the cached one stays float32 for training copies)."""
        return model if self.dtype == torch.float32 else copy.deepcopy(model).to(self.dtype)

    def _timm_deit(self, **kwargs):
        return self._timm.create_model(TIMM_MODEL, pretrained=False, drop_path_rate=0.1, **kwargs)

    def _build_timm_step1(self):
        model = self._timm_deit(num_classes=len(self.cam_id2label), img_size=224, dynamic_img_size=True)
        return set_timm_attention(model, fused=False)

    def _build_cam_c20(self):
        WeakTrConfig, WeakTrForCAM, _ = self._classes
        model = WeakTrForCAM(WeakTrConfig(image_size=224, id2label=self.cam_id2label))
        self._load(model, self.get("timm_step1").cpu())
        return model

    def _build_cam_c1(self):
        WeakTrConfig, WeakTrForCAM, _ = self._classes
        model = WeakTrForCAM(WeakTrConfig(image_size=224, id2label={0: "object"}))
        self._load(model, self.get("timm_step1").cpu())
        return model

    def _build_timm_step1_reg19(self):
        cam = self.get("cam_c20")
        model = self._timm_deit(
            num_classes=len(self.cam_id2label), img_size=224, dynamic_img_size=True, reg_tokens=cam.num_labels - 1
        )
        state = self.get("timm_step1").state_dict()
        state["pos_embed"] = cam.weaktr.pos_embed.detach().clone()  # the [CLS] row repeated, as our class tokens
        state["reg_token"] = cam.weaktr.cls_token[:, 1:].detach().clone()
        model.load_state_dict(state)
        return set_timm_attention(model, fused=False)

    def _build_timm_step2(self):
        model = self._timm_deit(num_classes=len(self.seg_id2label), img_size=480, dynamic_img_size=True)
        return set_timm_attention(model, fused=True)

    def _build_seg(self):
        WeakTrConfig, _, WeakTrForSemanticSegmentation = self._classes
        # clip_start_value is high so the gradient-clipping branch always runs in training (as late in training).
        config = WeakTrConfig(image_size=480, id2label=self.seg_id2label, clip_start_value=1e6)
        model = WeakTrForSemanticSegmentation(config)
        self._load(model, self.get("timm_step2").cpu())
        return model

    def _build_timm_backbone(self, variant):
        name, extra = TIMM_BACKBONES[variant]
        model = self._timm.create_model(
            name, pretrained=False, img_size=480, patch_size=16, num_classes=0, drop_path_rate=0.1,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), **extra,
        )  # fmt: skip
        with torch.no_grad():  # LayerScale starts at 1e-5 in timm: make every branch count
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        return set_timm_attention(model, fused=True)

    def _build_seg_backbone(self, variant):
        from weaktr_hf.configuration_weaktr import ENCODER_VARIANTS

        WeakTrConfig, _, WeakTrForSemanticSegmentation = self._classes
        fields = dict(ENCODER_VARIANTS[variant], **({"intermediate_size": 1024} if variant == "eva02" else {}))
        config = WeakTrConfig(image_size=480, id2label=self.seg_id2label, layer_norm_eps=1e-5, **fields)
        model = WeakTrForSemanticSegmentation(config)
        self._load(model, self.get(f"timm_{variant}").cpu())
        return model

    def _build_timm_dinov2(self):
        return self._build_timm_backbone("dinov2")

    def _build_timm_eva02(self):
        return self._build_timm_backbone("eva02")

    def _build_seg_dinov2(self):
        return self._build_seg_backbone("dinov2")

    def _build_seg_eva02(self):
        return self._build_seg_backbone("eva02")

    def _random_timm(self, name, **kwargs):
        model = self._timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        with torch.no_grad():  # LayerScale starts at 1e-5 in timm: make every branch count
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        return model

    def _build_timm_family(self, family):
        return set_timm_attention(self._random_timm(TIMM_FAMILIES[family][1], drop_path_rate=0.1), fused=True)

    def _build_seg_family(self, family):
        _, _, WeakTrForSemanticSegmentation = self._classes
        return WeakTrForSemanticSegmentation.from_timm_backbone(
            self.get(f"timm_{family}").cpu(), id2label=self.seg_id2label, image_size=480
        )

    def backbone_parity(self, backbones):
        """Max abs differences of our step-2 encoders of `backbones` from timm's on the same weights (480x480)."""
        pixels = torch.randn(1, 3, 480, 480, generator=torch.Generator().manual_seed(0)).to(self.device)
        differences = {}
        with torch.inference_mode():
            for variant in backbones:
                reference = self.get(f"timm_{variant}").forward_features(pixels)
                ours = self.get(f"seg_{variant}").weaktr(pixels).last_hidden_state
                differences[f"step2_{variant}_encoder_vs_timm"] = (ours - reference).abs().max().item()
        return differences

    def family_parity(self):
        """Full-depth base-size check per family: max abs difference of the patch tokens of a segmenter built with
        `from_timm_backbone` from timm's `forward_features` (EVA's `fc_norm` applied to every token), batch 2."""
        _, _, WeakTrForSemanticSegmentation = self._classes
        differences = {}
        for name in FULL_DEPTH_PARITY:
            for height, width in PARITY_SIZES:
                kwargs = {} if "dinov3" in name else {"img_size": (height, width)}
                if "patch14" in name and (height, width) != (224, 224):
                    kwargs["patch_size"] = 16
                torch.manual_seed(0)
                reference = self._random_timm(name, **kwargs).eval()
                model = WeakTrForSemanticSegmentation.from_timm_backbone(reference, id2label=self.seg_id2label).eval()
                pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
                with torch.inference_mode():
                    expected = reference.forward_features(pixels)
                    if not isinstance(reference.fc_norm, torch.nn.Identity):
                        expected = reference.fc_norm(expected)
                    ours = model.weaktr(pixels).last_hidden_state
                start = reference.num_prefix_tokens
                key = f"full_depth_{name}_{height}x{width}_patch_tokens_vs_timm"
                differences[key] = (ours[:, start:] - expected[:, start:]).abs().max().item()
        return differences

    def parity(self):
        """Max abs differences between our encoders and the timm models they are benchmarked against (~1e-5)."""
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            pixels = torch.randn(1, 3, 224, 224, generator=generator).to(self.device)
            timm_reg = self.get("timm_step1_reg19")
            reference = timm_reg.blocks(timm_reg._pos_embed(timm_reg.patch_embed(pixels)))  # no final norm, as ours
            ours = self.get("cam_c20").weaktr(pixels).last_hidden_state
            step1 = (ours - reference).abs().max().item()
            pixels = torch.randn(1, 3, 480, 480, generator=generator).to(self.device)
            reference = self.get("timm_step2").forward_features(pixels)
            step2 = (self.get("seg").weaktr(pixels).last_hidden_state - reference).abs().max().item()
        return {"step1_encoder_vs_timm_reg19": step1, "step2_encoder_vs_timm": step2}


# ---------------------------------------------------------------------------------------------------------------------
# Cases: each returns its callables (name -> zero-argument function) and the rows comparing them
# ---------------------------------------------------------------------------------------------------------------------


def random_pixels(batch, height, width, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator).to(device=device, dtype=dtype)


def forward_fn(model, *args, **kwargs):
    def run():
        with torch.inference_mode():
            model(*args, **kwargs)

    return run


def case_step1(zoo, spec):
    size, batch = spec["size"], spec["batch"]
    pixels = random_pixels(batch, size, size, zoo.device, zoo.dtype)
    callables = {
        "cam_c20": forward_fn(zoo.cast(zoo.get("cam_c20")), pixels),
        "cam_c1": forward_fn(zoo.cast(zoo.get("cam_c1")), pixels),
        "timm_eager": forward_fn(zoo.cast(zoo.get("timm_step1")), pixels),
        "timm_eager_reg19": forward_fn(zoo.cast(zoo.get("timm_step1_reg19")), pixels),
    }
    grid = (size // 16) ** 2
    case = f"{size}x{size} b{batch}"
    rows = [
        ("cam_c20", "timm_eager_reg19", f"WeakTrForCAM C=20 ({20 + grid} tokens)",
         f"timm eager + 19 register tokens ({20 + grid} tokens)", 1.3 if batch >= 8 else None),
        ("cam_c20", "timm_eager", f"WeakTrForCAM C=20 ({20 + grid} tokens)", f"timm eager ({1 + grid} tokens)", None),
        ("cam_c1", "timm_eager", f"WeakTrForCAM C=1 ({1 + grid} tokens)", f"timm eager ({1 + grid} tokens)", None),
    ]  # fmt: skip
    return case, callables, rows


class TimmFeaturesDecoder(torch.nn.Module):
    """The step-2 floor: timm's `forward_features` (SDPA, final norm) then our decoder on the patch tokens."""

    def __init__(self, timm_model, decoder, patch_size):
        super().__init__()
        self.encoder, self.decoder, self.patch_size = timm_model, decoder, patch_size

    def forward(self, pixel_values):
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        tokens = self.encoder.forward_features(pixel_values)
        return self.decoder(tokens[:, self.encoder.num_prefix_tokens :], grid)[0]


class TimmFeaturesLinear(torch.nn.Module):
    """timm's `forward_features` then a linear classifier per patch token: the plain-ViT segmentation baseline."""

    def __init__(self, timm_model, num_labels, patch_size):
        super().__init__()
        self.encoder, self.patch_size = timm_model, patch_size
        self.head = torch.nn.Linear(timm_model.num_features, num_labels)

    def forward(self, pixel_values):
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        tokens = self.encoder.forward_features(pixel_values)[:, self.encoder.num_prefix_tokens :]
        return self.head(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def case_step2(zoo, spec):
    size, batch = spec["size"], spec["batch"]
    pixels = random_pixels(batch, size, size, zoo.device, zoo.dtype)
    seg = zoo.get("seg")
    floor = TimmFeaturesDecoder(zoo.get("timm_step2"), seg.decoder, seg.config.patch_size).eval()
    callables = {"seg": forward_fn(zoo.cast(seg), pixels), "floor": forward_fn(zoo.cast(floor), pixels)}
    rows = [
        (
            "seg",
            "floor",
            "WeakTrForSemanticSegmentation (SDPA)",
            "floor: timm forward_features (SDPA) + our decoder",
            1.05,
        )
    ]
    return f"{size}x{size} b{batch}", callables, rows


def case_backbones(zoo, spec):
    """Step 2 on the authors' DINOv2-S / EVA-02-S and on DINOv3-S / B: our segmenter against timm's encoder + our
    decoder."""
    variant, size, batch = spec["variant"], spec["size"], spec["batch"]
    pixels = random_pixels(batch, size, size, zoo.device, zoo.dtype)
    seg = zoo.get(f"seg_{variant}")
    floor = TimmFeaturesDecoder(zoo.get(f"timm_{variant}"), seg.decoder, seg.config.patch_size).eval()
    if variant in TIMM_FAMILIES:
        name, timm_name = TIMM_FAMILIES[variant]
    else:
        name, timm_name = {"dinov2": "DINOv2-S", "eva02": "EVA-02-S"}[variant], TIMM_BACKBONES[variant][0]
    callables = {"seg": forward_fn(zoo.cast(seg), pixels), "floor": forward_fn(zoo.cast(floor), pixels)}
    rows = [("seg", "floor", f"WeakTrForSemanticSegmentation {name} (SDPA)",
             f"floor: timm {timm_name} forward_features (SDPA) + our decoder", 1.05)]  # fmt: skip
    return f"{name} {size}x{size} b{batch}", callables, rows


def train_step_fn(model, loss_fn, device, dtype):
    """One forward + backward + AdamW step; bf16 runs under autocast with float32 weights."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def run():
        with autocast:
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def case_train(zoo, spec):
    from weaktr_hf import semantic_segmentation_loss, upsample_logits

    size, batch = spec["size"], spec["batch"]
    device, dtype = zoo.device, zoo.dtype
    pixels = random_pixels(batch, size, size, device, torch.float32)
    generator = torch.Generator().manual_seed(1)
    if spec["model"] == "step1":
        labels = (torch.rand(batch, 20, generator=generator) > 0.8).float().to(device)
        labels[:, 0] = 1.0

        def timm_loss(model):
            return F.multilabel_soft_margin_loss(model(pixels).float(), labels)

        callables = {
            "cam_c20": train_step_fn(
                zoo.get("cam_c20"), lambda model: model(pixels, labels=labels).loss, device, dtype
            ),
            "timm_eager_reg19": train_step_fn(zoo.get("timm_step1_reg19"), timm_loss, device, dtype),
            "timm_eager": train_step_fn(zoo.get("timm_step1"), timm_loss, device, dtype),
        }
        rows = [
            ("cam_c20", "timm_eager_reg19", "WeakTrForCAM C=20 train step",
             "timm eager + 19 registers, linear head, multi-label loss", None),
            ("cam_c20", "timm_eager", "WeakTrForCAM C=20 train step",
             "timm eager, linear head, multi-label loss", None),
        ]  # fmt: skip
        return f"step 1, {size}x{size} b{batch}", callables, rows

    seg = zoo.get("seg")
    config, patch_size = seg.config, seg.config.patch_size
    masks = torch.randint(0, config.num_labels, (batch, size, size), generator=generator)
    masks = masks.masked_fill(torch.rand(batch, size, size, generator=generator) < 0.1, 255).to(device)
    floor = TimmFeaturesDecoder(zoo.get("timm_step2"), seg.decoder, patch_size)
    linear = TimmFeaturesLinear(zoo.get("timm_step2"), config.num_labels, patch_size).to(device)

    def decoder_loss(model):
        return semantic_segmentation_loss(upsample_logits(model(pixels), (size, size), patch_size), masks, config)

    def linear_loss(model):
        logits = upsample_logits(model(pixels).float(), (size, size), patch_size)
        return F.cross_entropy(logits, masks, ignore_index=config.semantic_loss_ignore_index)

    callables = {
        "seg": train_step_fn(seg, lambda model: model(pixels, labels=masks).loss, device, dtype),
        "floor": train_step_fn(floor, decoder_loss, device, dtype),
        "timm_linear": train_step_fn(linear, linear_loss, device, dtype),
    }
    rows = [
        ("seg", "floor", "WeakTrForSemanticSegmentation train step",
         "timm (SDPA) + our decoder + our clipped loss", 1.05),
        ("seg", "timm_linear", "WeakTrForSemanticSegmentation train step", "timm (SDPA), linear head, cross-entropy",
         None),
    ]  # fmt: skip
    return f"step 2, {size}x{size} b{batch}", callables, rows


def case_cam(zoo, spec):
    height, width = CAM_IMAGE_SIZE
    model = zoo.cast(zoo.get("cam_c20"))
    pixels = random_pixels(1, height, width, zoo.device, zoo.dtype)
    labels = [[0, 14]]  # aeroplane and person present
    try:
        from weaktr_hf.inference import generate_cams, scaled_input_size
    except ImportError:
        generate_cams = None

        def scaled_input_size(size, scale, patch_size):
            return tuple(max(1, round(side * scale / patch_size)) * patch_size for side in size)

    passes = []
    for scale in CAM_SCALES:
        size = scaled_input_size((height, width), scale, model.config.patch_size)
        scaled = F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False).to(zoo.dtype)
        passes += [scaled, scaled.flip(-1)]

    def bare_forwards():
        with torch.inference_mode():
            for inputs in passes:
                model(inputs)

    callables = {"forwards": bare_forwards}
    sizes = " + ".join(f"{tuple(p.shape[-2:])}" for p in passes[::2])
    if generate_cams is None:
        rows = [("forwards", None, f"4 WeakTrForCAM forwards {sizes} (generate_cams not found)", "-", None)]
    else:
        callables["generate_cams"] = lambda: generate_cams(model, pixels, labels, scales=CAM_SCALES, flip=True)
        rows = [("generate_cams", "forwards", "generate_cams, scales 1.0/1.2 + flip",
                 f"its 4 bare forwards {sizes}", None)]  # fmt: skip
    return f"{width}x{height} image, C=20", callables, rows


def case_compile(zoo, spec):
    size, batch = spec["size"], spec["batch"]
    pixels = random_pixels(batch, size, size, zoo.device, zoo.dtype)
    model = zoo.cast(zoo.get("cam_c20" if spec["model"] == "step1" else "seg"))
    compiled = torch.compile(model)
    callables = {"compiled": forward_fn(compiled, pixels), "eager": forward_fn(model, pixels)}
    rows = [("compiled", "eager", f"{type(model).__name__} torch.compile (inductor)", "same model, eager", None)]
    return f"{size}x{size} b{batch}", callables, rows


CASES = {
    "step1": case_step1, "step2": case_step2, "backbones": case_backbones, "train": case_train, "cam": case_cam,
    "compile": case_compile,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_times(callables, warmup, repeats, device, clock=time.perf_counter):
    """Per-callable lists of seconds by `clock`; rounds interleave the callables, rotating their order.

    The first warm-up call of each callable is timed too and returned as `first_call_s` (the compile time for
    compiled models).
    """
    names = list(callables)
    first_call = {}
    for name in names:
        for index in range(warmup):
            synchronize(device)
            start = clock()
            callables[name]()
            synchronize(device)
            if index == 0:
                first_call[name] = clock() - start
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            synchronize(device)
            start = clock()
            callables[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return times, first_call


def _proc_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_peaks(callables, device, warmup=True):
    """Peak memory of one call of each callable, in MiB; with `warmup`, after one untimed call.

    CUDA: `torch.cuda.max_memory_allocated` minus the memory allocated before the call (tensor memory only).
    CPU: the process's resident-set high-water mark (VmHWM, reset before the call) minus its resident set before the
    call: the extra physical memory the call touched at its peak (tensors, allocator and library workspaces). The
    memory worker runs with glibc's mmap threshold pinned low, so freed tensors go back to the OS and one case does
    not hide in memory left over from the previous one.
    """
    peaks = {}
    for name, run in callables.items():
        if warmup:
            run()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - before) / MIB
        else:
            _reset_peak_rss()
            before = _proc_status_kib("VmRSS")
            run()
            peaks[name] = (_proc_status_kib("VmHWM") - before) / 1024
    return peaks


def memory_worker(args):
    """Entry point of the CPU memory subprocess: measure every case spec, print one JSON line.

    Forward-only cases are measured on their first call, after one process-wide warm-up on small inputs (thread
    pools, library workspaces): their peaks then agree with a second call's to a few MiB and the worker takes half
    the time. Training cases get a warm-up step of their own, so the AdamW state exists before the measured step.
    """
    specs = json.loads(args.memory_worker)
    results = []
    zoos = {}
    for spec in specs:
        if spec["section"] == "compile":
            results.append(None)
            continue
        dtype = getattr(torch, spec["dtype"])
        if spec["dtype"] not in zoos:
            zoos[spec["dtype"]] = ModelZoo(args.device, dtype)
            warm_up_process(zoos[spec["dtype"]], specs)
        zoo = zoos[spec["dtype"]]
        try:
            _, callables, _ = CASES[spec["section"]](zoo, spec)
            results.append(measure_peaks(callables, args.device, warmup=spec["section"] == "train"))
        except Exception as error:  # keep the other cases' numbers; the main process reports this one's error
            results.append({"error": f"{type(error).__name__}: {error}"})
        callables = None
        gc.collect()
    print("MEMORY_RESULTS " + json.dumps(results), flush=True)


def warm_up_process(zoo, specs):
    """Run the models of the planned forward sections once on small inputs."""
    sections = {spec["section"] for spec in specs}
    small = []
    if sections & {"step1", "cam"}:
        small.append(case_step1(zoo, {"size": 224, "batch": 1}))
    if "step2" in sections:
        small.append(case_step2(zoo, {"size": 224, "batch": 1}))
    for _, callables, _ in small:
        for run in callables.values():
            run()


def run_memory_subprocess(args, specs):
    """Peak memory of all CPU cases, measured in one fresh subprocess (see `measure_peaks`)."""
    env = dict(os.environ)
    # Fixed (not adaptive) thresholds: allocations >= 128 KiB are mmap'ed and unmapped on free.
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(specs), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("MEMORY_RESULTS "):
            return json.loads(line.removeprefix("MEMORY_RESULTS "))
    message = (completed.stderr.strip().splitlines() or ["no output"])[-1]
    print(f"warning: memory worker failed (exit {completed.returncode}): {message}", file=sys.stderr)
    return [{"error": message}] * len(specs)


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------


def machine_info(args):
    import timm
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows):
    """Markdown table of the result rows."""
    header = ["section", "case", "dtype", "model", "baseline", "model ms", "baseline ms", "time ratio",
              "ratio of minima", "model peak MiB", "baseline peak MiB", "target"]  # fmt: skip

    def number(value, digits=0):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["section"], row["case"], row["dtype"], row["model"], row["baseline"],
            number(row["time_s"] * 1000), number(row["baseline_time_s"] and row["baseline_time_s"] * 1000),
            number(row["time_ratio"], 2), number(row["time_ratio_of_minima"], 2), number(row["peak_mib"]),
            number(row["baseline_peak_mib"]),
            "-" if row["target"] is None else f"<= {row['target']}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        return memory_worker(args)

    started = time.time()
    started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    specs = plan_cases(args)
    zoos = {name: ModelZoo(args.device, getattr(torch, name)) for name in args.dtypes}
    parity = zoos["float32"].parity() if "float32" in zoos else None
    if parity is not None and "backbones" in args.sections:
        parity.update(zoos["float32"].backbone_parity(args.backbones))
        if any(name in TIMM_FAMILIES for name in args.backbones):
            parity.update(zoos["float32"].family_parity())
    if parity:
        print(f"encoder parity with the timm baselines (max abs diff): {parity}", flush=True)

    measured = []
    for spec in specs:
        zoo = zoos[spec["dtype"]]
        case, callables, rows = CASES[spec["section"]](zoo, spec)
        case_start = time.time()
        clock = time.process_time if args.timer == "cpu" else time.perf_counter
        times, first_call = measure_times(callables, max(args.warmup, 1), args.repeats, args.device, clock)
        peaks = measure_peaks(callables, args.device) if args.device != "cpu" and not args.no_memory else None
        measured.append((spec, case, rows, times, first_call, peaks, os.getloadavg()[0]))
        medians = {name: statistics.median(values) for name, values in times.items()}
        print(f"[{time.time() - started:6.0f}s] {spec['section']:8s} {case:22s} {spec['dtype']:9s} "
              + "  ".join(f"{name} {value * 1000:.0f} ms" for name, value in medians.items())
              + f"  ({time.time() - case_start:.0f}s)", flush=True)  # fmt: skip
        del callables
        gc.collect()

    cpu_peaks = None
    if args.device == "cpu" and not args.no_memory:
        print(f"[{time.time() - started:6.0f}s] measuring peak memory in a fresh process ...", flush=True)
        cpu_peaks = run_memory_subprocess(args, specs)

    result_rows = []
    for index, (spec, case, rows, times, first_call, peaks, load) in enumerate(measured):
        peaks = cpu_peaks[index] if cpu_peaks is not None else peaks
        peaks = peaks or {}
        for name, baseline, model_label, baseline_label, target in rows:
            time_s = statistics.median(times[name])
            baseline_s = statistics.median(times[baseline]) if baseline else None
            result_rows.append({
                "section": spec["section"], "case": case, "dtype": spec["dtype"], "model": model_label,
                "baseline": baseline_label, "time_s": time_s, "baseline_time_s": baseline_s,
                "time_ratio": time_s / baseline_s if baseline else None,
                "time_ratio_of_minima": min(times[name]) / min(times[baseline]) if baseline else None,
                "peak_mib": peaks.get(name), "baseline_peak_mib": peaks.get(baseline) if baseline else None,
                "peak_error": peaks.get("error"), "target": target,
                "times_s": times[name], "baseline_times_s": times[baseline] if baseline else None,
                "first_call_s": first_call.get(name), "load_average": load,
            })  # fmt: skip

    table = format_table(result_rows)
    print()
    print(table)
    report = {
        "date": started_at,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": args.device,
        "machine": machine_info(args),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {
            "repeats": args.repeats,
            "warmup": max(args.warmup, 1),
            "dtypes": args.dtypes,
            "sections": list(args.sections),
            "timer": args.timer,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "memory_method": None
        if args.no_memory
        else (
            "torch.cuda.max_memory_allocated - memory_allocated before the call"
            if args.device != "cpu"
            else "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the call, in a fresh process with a fixed "
            "128 KiB glibc mmap threshold; training cases after one warm-up step"
        ),  # fmt: skip
        "encoder_parity_max_abs_diff": parity,
        "wall_time_s": time.time() - started,
        "rows": result_rows,
        "markdown_table": table,
    }
    if args.output:
        directory = os.path.dirname(args.output)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"\nwrote {args.output} ({report['wall_time_s']:.0f}s; load average {load_before[0]:.1f} -> "
              f"{report['load_average_after'][0]:.1f})")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
