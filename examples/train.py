#!/usr/bin/env python
"""WeakTr's whole weakly-supervised segmentation recipe with Accelerate.

    accelerate launch examples/train.py            # offline demo on the built-in synthetic dataset (<10 min, CPU)
    accelerate launch examples/train.py --preset voc12-deit-s --dataset_path /data/VOCdevkit/VOC2012 \
        --backbone deit_small_patch16_224 --output_dir runs/voc12

Stages (`--stage`, default `all`), each reading what the previous one wrote in `--output_dir`:
  cam     step 1: train WeakTrForCAM from image-level labels; keep the epoch with the best CAM mIoU on a train subset
  pseudo  multi-scale + flip CAMs -> background threshold -> dense CRF -> one pseudo-label PNG per training image
  seg     step 2: train WeakTrForSemanticSegmentation on the pseudo-labels with the gradient-clipping loss
  eval    score the segmenter on the validation split (single scale, multi-scale + flip), write PNGs and the table
"""

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from weaktr_hf import (
    WeakTrConfig,
    WeakTrForCAM,
    WeakTrForSemanticSegmentation,
    WeakTrImageProcessor,
    load_timm_backbone,
)
from weaktr_hf.crf import COCO_PSEUDO_LABEL_CRF, SEGMENTATION_CRF, VOC_PSEUDO_LABEL_CRF
from weaktr_hf.data import (
    CAMCollator,
    CAMTrainTransform,
    SegmentationCollator,
    SegmentationTrainTransform,
    get_class_names,
    load_wsss_dataset,
    trivial_baseline_miou,
)
from weaktr_hf.evaluation import evaluate_cams, evaluate_segmentation
from weaktr_hf.hub import push_folder_to_hub, render_model_card
from weaktr_hf.inference import generate_cams
from weaktr_hf.labels import foreground_id2label, segmentation_id2label
from weaktr_hf.pseudo_labels import evaluate_pseudo_labels, pseudo_label_dataset, write_pseudo_labels
from weaktr_hf.training import (
    SeededTransformDataset,
    TrainState,
    build_cam_optimizer,
    build_scheduler,
    build_seg_optimizer,
    release_training_state,
    save_pretrained_atomic,
    train_model,
    write_json_atomic,
)
from weaktr_hf.visualization import colorize_mask, overlay_cam, side_by_side

logger = logging.getLogger("weaktr")

STAGES = ("cam", "pseudo", "seg", "eval")
CAM_NAMES = ("coarse_cam", "fine_cam", "cross_attention")

# Every hyper-parameter of a recipe. Flags given on the command line override the preset's value.
PRESETS = {
    # Offline demo: the built-in synthetic dataset and a small ViT trained from scratch on 2 CPU cores in minutes.
    # No ImageNet weights can be had offline, so this is a smoke test of the whole pipeline, not a reproduction.
    "demo": dict(
        dataset_path="synthetic", synthetic_num_classes=4, synthetic_image_size=64, synthetic_num_train=1000,
        synthetic_num_val=100,
        # A 4-layer ViT of width 128 on 8-px patches (an 8 x 8 grid): small enough for ~1,000 steps in a few minutes.
        patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        drop_path_rate=0.0, aaf_reduction=2, aaf_feat_reduction=2,
        cam_image_size=64, cam_augment="light", per_device_train_batch_size=32, learning_rate=2e-3,
        weight_decay=0.03, num_train_epochs=30, warmup_epochs=2, cam_eval_samples=64,
        # From scratch the fine CAM is not yet reliable (shared/docs/CALIBRATION.md): pick the best of the three
        # CAMs and the threshold on the train subset, and report all three.
        cam_threshold="sweep", cam_sweep_thresholds=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        cam_scales=(1.0, 1.25), cam_flip=True, pseudo_label_cam="auto", crf="voc12",
        seg_image_size=64, seg_crop_size=64, seg_base_size=64, seg_per_device_train_batch_size=16,
        seg_learning_rate=0.01, seg_encoder_lr_scale=0.1, seg_num_train_epochs=10, seg_init="cam",
        decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=512, decoder_hidden_dropout_prob=0.0,
        # 32-px windows: 4 per 64-px crop, as 120-px windows are 4 per side of the paper's 480 crops.
        clip_start_value=1.2, clip_window_size=32,
        window_size=64, window_stride=48, eval_scales=(0.75, 1.0, 1.25), eval_samples=None,
        # One intra-op thread per process: this model's ops are too small to split, and two threads sharing 2 cores
        # with any other process were measured 17x slower per step (3.5 s vs 0.21 s).
        num_threads=1,
        # One loader process prepares batches on the other core; augmentation is seeded per sample, so the results
        # are identical to loading in the main process (checked bit for bit), only faster.
        dataloader_num_workers=1,
    ),  # fmt: skip
    # The authors' DeiT-S recipe on PASCAL VOC 2012 (METHOD.md); needs --dataset_path and ImageNet weights.
    "voc12-deit-s": dict(
        patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        drop_path_rate=0.1, aaf_reduction=8, aaf_feat_reduction=8,
        cam_image_size=224, cam_augment="timm", per_device_train_batch_size=64, learning_rate=6e-4 * 64 / 512,
        weight_decay=0.03, num_train_epochs=60, warmup_epochs=5, cam_eval_samples=1464, cam_threshold=0.43,
        cam_sweep_thresholds=(0.40, 0.45, 0.50, 0.55, 0.60), cam_scales=(1.0, 1.2), cam_flip=True,
        pseudo_label_cam="fine_cam", crf="voc12", train_split="train_aug",
        seg_image_size=480, seg_crop_size=480, seg_base_size=512, seg_per_device_train_batch_size=4,
        seg_learning_rate=1e-4, seg_encoder_lr_scale=0.1, seg_num_train_epochs=64, seg_init="backbone",
        decoder_hidden_size=384, decoder_num_hidden_layers=2, decoder_num_attention_heads=6,
        decoder_intermediate_size=1536, decoder_hidden_dropout_prob=0.1,
        clip_start_value=1.2, clip_window_size=120,
        window_size=480, window_stride=320, eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), eval_samples=None,
    ),  # fmt: skip
}
PRESETS["coco14-deit-s"] = dict(
    PRESETS["voc12-deit-s"], learning_rate=2e-4, cam_threshold=0.42, cam_scales=(1.0, 0.8, 1.2), crf="coco14",
    train_split="train", cam_eval_samples=1250,
)  # fmt: skip
CRF_PRESETS = {"voc12": VOC_PSEUDO_LABEL_CRF, "coco14": COCO_PSEUDO_LABEL_CRF}
FALLBACKS = dict(
    dataset_path="synthetic", train_split="train", val_split="val", seed=42, gradient_accumulation_steps=1,
    dataloader_num_workers=0, checkpoints_total_limit=2, logging_steps=10, max_train_steps=None,
    seg_max_train_steps=None, num_visualizations=4, crf="voc12", use_gradient_clipping=True, backbone=None,
    cam_model_name_or_path=None, num_threads=None,
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", default="demo", choices=sorted(PRESETS), help="recipe whose hyper-parameters are the defaults")
    add("--stage", default="all", choices=("all",) + STAGES)
    add("--output_dir", default="outputs/weaktr-demo")
    add("--dataset_path", help="'synthetic', a VOCdevkit/VOC2012 or COCO root, a saved dataset or a Hub id")
    add("--train_split")
    add("--val_split")
    add("--backbone", help="ImageNet init: a timm model name (needs network) or a local timm checkpoint file")
    add("--cam_model_name_or_path", help="start step 1 from a saved / converted WeakTrForCAM instead")
    add("--seed", type=int)
    # Step 1 (the standard names configure the CAM stage).
    add("--per_device_train_batch_size", type=int)
    add("--learning_rate", type=float)
    add("--weight_decay", type=float)
    add("--num_train_epochs", type=int)
    add("--max_train_steps", type=int, help="overrides --num_train_epochs")
    add("--warmup_epochs", type=float)
    add("--gradient_accumulation_steps", type=int)
    add("--cam_image_size", type=int)
    add("--cam_augment", choices=("timm", "light", "none"))
    add("--cam_eval_samples", type=int, help="train images scored after each epoch to pick the best one")
    add("--cam_threshold", help="background score, or 'sweep' to pick it on the train subset")
    add("--cam_sweep_thresholds", type=float, nargs="+")
    add("--cam_scales", type=float, nargs="+")
    add("--no_cam_flip", dest="cam_flip", action="store_false", default=None)
    add("--pseudo_label_cam", choices=CAM_NAMES + ("auto",),
        help="CAM behind the pseudo-labels; 'auto' picks the best of the three on the train subset each epoch")
    add("--crf", choices=sorted(CRF_PRESETS), help="dense-CRF parameters for the pseudo-labels")
    add("--no_crf", action="store_true", help="skip the dense CRF (pseudo-labels straight from the CAMs)")
    # Model size (presets set them; override for experiments).
    for name in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "aaf_reduction", "aaf_feat_reduction", "decoder_hidden_size", "decoder_num_hidden_layers",
                 "decoder_num_attention_heads", "decoder_intermediate_size", "clip_window_size"):  # fmt: skip
        add(f"--{name}", type=int)
    for name in ("drop_path_rate", "decoder_hidden_dropout_prob", "clip_start_value"):
        add(f"--{name}", type=float)
    # Step 2.
    add("--seg_per_device_train_batch_size", type=int)
    add("--seg_learning_rate", type=float)
    add("--seg_encoder_lr_scale", type=float)
    add("--seg_num_train_epochs", type=int)
    add("--seg_max_train_steps", type=int)
    add("--seg_image_size", type=int)
    add("--seg_crop_size", type=int)
    add("--seg_base_size", type=int)
    add("--seg_init", choices=("backbone", "cam", "scratch"), help="encoder init: --backbone, the step-1 encoder, none")
    add("--no_gradient_clipping", dest="use_gradient_clipping", action="store_false", default=None)
    # Evaluation.
    add("--window_size", type=int)
    add("--window_stride", type=int)
    add("--eval_scales", type=float, nargs="+")
    add("--eval_samples", type=int, help="score only the first N validation images")
    add("--num_visualizations", type=int)
    # Synthetic data.
    add("--synthetic_num_classes", type=int)
    add("--synthetic_image_size", type=int)
    add("--synthetic_num_train", type=int)
    add("--synthetic_num_val", type=int)
    # Loop, checkpoints, tracking, Hub.
    add("--dataloader_num_workers", type=int)
    add("--num_threads", type=int, help="torch intra-op threads per process (default: torch's choice)")
    add("--checkpointing_steps", help="save the training state every N updates, or 'epoch'")
    add("--checkpoints_total_limit", type=int)
    add("--resume_from_checkpoint", help="'latest' or a checkpoint folder of the stage being trained")
    add("--logging_steps", type=int)
    add("--with_tracking", action="store_true")
    add("--report_to", default="tensorboard")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id")
    add("--hub_token")
    args = parser.parse_args(argv)
    return apply_preset(args, parser)


def apply_preset(args, parser):
    """Unset flags take the preset's value, then the fallback; anything given on the command line wins."""
    preset = PRESETS[args.preset]
    for key, value in {**FALLBACKS, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("cam_flip",):
        if getattr(args, key) is None:
            setattr(args, key, True)
    if args.preset != "demo" and args.dataset_path == "synthetic" and "dataset_path" not in preset:
        parser.error(f"--preset {args.preset} needs --dataset_path (a VOCdevkit/VOC2012 or COCO root, or a Hub id).")
    if args.cam_threshold != "sweep":
        try:
            args.cam_threshold = float(args.cam_threshold)
        except ValueError:
            parser.error(f"--cam_threshold must be a number or 'sweep', got {args.cam_threshold!r}.")
    if args.checkpointing_steps not in (None, "epoch"):
        if not str(args.checkpointing_steps).isdigit():
            parser.error(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}.")
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.seg_init == "backbone" and not args.backbone:
        args.seg_init = "scratch"
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def load_data(args):
    if args.dataset_path == "synthetic":
        return load_wsss_dataset(
            "synthetic", num_classes=args.synthetic_num_classes, image_size=args.synthetic_image_size,
            num_train=args.synthetic_num_train, num_val=args.synthetic_num_val, seed=args.seed,
        )  # fmt: skip
    return load_wsss_dataset(args.dataset_path)


def split(dataset, name):
    if name not in dataset:
        raise KeyError(f"The dataset has no split {name!r} (it has {sorted(dataset)}); set --train_split/--val_split.")
    return dataset[name]


def model_config(args, id2label, image_size):
    return WeakTrConfig(
        image_size=image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, drop_path_rate=args.drop_path_rate,
        aaf_reduction=args.aaf_reduction, aaf_feat_reduction=args.aaf_feat_reduction,
        decoder_hidden_size=args.decoder_hidden_size, decoder_num_hidden_layers=args.decoder_num_hidden_layers,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        decoder_intermediate_size=args.decoder_intermediate_size,
        decoder_hidden_dropout_prob=args.decoder_hidden_dropout_prob,
        use_gradient_clipping=args.use_gradient_clipping, clip_start_value=args.clip_start_value,
        clip_window_size=args.clip_window_size, id2label=id2label,
        layer_norm_eps=1e-6 if args.backbone else 1e-5,
    )  # fmt: skip


def encoder_state_from_cam(cam_model):
    """The step-1 encoder in timm layout with one [CLS] token (the mean of the class tokens), to start step 2 from."""
    state = {key: value for key, value in cam_model.weaktr.state_dict().items()}
    num_classes = cam_model.config.num_labels
    state["cls_token"] = state["cls_token"].mean(dim=1, keepdim=True)
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :num_classes].mean(dim=1, keepdim=True), pos[:, num_classes:]], dim=1)
    return state


def make_loader(dataset, transform, collator, batch_size, seed, num_workers, shuffle=True):
    return DataLoader(
        SeededTransformDataset(dataset, transform, seed=seed), batch_size=batch_size, shuffle=shuffle,
        collate_fn=collator, num_workers=num_workers, generator=torch.Generator().manual_seed(seed), drop_last=False,
    )  # fmt: skip


def training_steps(loader, epochs, max_steps, accumulation):
    steps_per_epoch = math.ceil(len(loader) / accumulation)
    return max_steps or epochs * steps_per_epoch, steps_per_epoch


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


def cam_stage(args, accelerator, dataset, class_names, results):
    """Step 1: train the CAM model; after each epoch score the fine CAM on a train subset, keep the best epoch."""
    train = split(dataset, args.train_split)
    if args.cam_model_name_or_path:
        model = WeakTrForCAM.from_pretrained(args.cam_model_name_or_path)
    else:
        model = WeakTrForCAM(model_config(args, foreground_id2label(class_names), args.cam_image_size))
        if args.backbone:
            report = load_timm_backbone(model, args.backbone)
            logger.info("Backbone %s: %d tensors loaded, unused %s", args.backbone, len(report.loaded_keys),
                        report.unused_keys)  # fmt: skip
    processor = WeakTrImageProcessor(size={"height": args.cam_image_size, "width": args.cam_image_size})
    transform = CAMTrainTransform(args.cam_image_size, augment=args.cam_augment)
    loader = make_loader(train, transform, CAMCollator(len(class_names)), args.per_device_train_batch_size,
                         args.seed, args.dataloader_num_workers)  # fmt: skip
    max_steps, steps_per_epoch = training_steps(
        loader, args.num_train_epochs, args.max_train_steps, args.gradient_accumulation_steps
    )
    optimizer = build_cam_optimizer(model, args.learning_rate, args.weight_decay)
    warmup = int(args.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler("cosine", optimizer, max_steps * accelerator.num_processes,
                                warmup * accelerator.num_processes)  # fmt: skip
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    thresholds = args.cam_sweep_thresholds if args.cam_threshold == "sweep" else (args.cam_threshold,)
    selection_subset = train.select(range(min(args.cam_eval_samples, len(train))))
    state = TrainState()

    candidates = CAM_NAMES if args.pseudo_label_cam == "auto" else (args.pseudo_label_cam,)

    def on_epoch_end(epoch, train_state):
        unwrapped = accelerator.unwrap_model(model)
        all_scores = evaluate_cams(unwrapped, selection_subset, cams=candidates, thresholds=thresholds,
                                   accelerator=accelerator, show_progress=False)  # fmt: skip
        cam = max(candidates, key=lambda name: all_scores[name]["mean_iou"])
        scores = all_scores[cam]
        accelerator.log({f"cam/selection_miou_{name}": value["mean_iou"] for name, value in all_scores.items()}
                        | {"cam/selection_miou": scores["mean_iou"], "cam/epoch": epoch},
                        step=train_state.completed_steps)  # fmt: skip
        improved = scores["mean_iou"] > train_state.best_metric
        accelerator.print(f"epoch {epoch}: " + ", ".join(f"{name} {value['mean_iou']:.3f} (t={value['threshold']:.2f})"
                          for name, value in all_scores.items()) + f" mIoU on {len(selection_subset)} train images"
                          + (f"; best so far with {cam}, saved" if improved else ""))  # fmt: skip
        if improved:
            train_state.best_metric, train_state.best_epoch = scores["mean_iou"], epoch
            save_pretrained_atomic(unwrapped, os.path.join(args.output_dir, "cam"), processor,
                                   accelerator.is_main_process)  # fmt: skip
            if accelerator.is_main_process:
                write_json_atomic(os.path.join(args.output_dir, "cam_selection.json"),
                                  {"epoch": epoch, "threshold": scores["threshold"], "cam": cam,
                                   "miou": scores["mean_iou"], "per_threshold": scores["per_threshold"]})  # fmt: skip
        model.train()

    start = time.time()
    train_model(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=max_steps,
        checkpoint_dir=os.path.join(args.output_dir, "checkpoints", "cam"),
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, train_state=state, on_epoch_end=on_epoch_end,
        log_prefix="cam", logging_steps=args.logging_steps,
    )  # fmt: skip
    release_training_state(accelerator)
    results.update(cam_train_seconds=round(time.time() - start, 1), cam_train_steps=max_steps,
                   cam_best_epoch=state.best_epoch, cam_selection_miou=state.best_metric)  # fmt: skip


def pseudo_label_choice(args):
    """(CAM name, background threshold) for the pseudo-labels: as given, or as picked on the train subset."""
    if args.cam_threshold != "sweep" and args.pseudo_label_cam != "auto":
        return args.pseudo_label_cam, args.cam_threshold
    path = os.path.join(args.output_dir, "cam_selection.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run --stage cam first, or give --cam_threshold and a CAM name.")
    with open(path, encoding="utf-8") as handle:
        selection = json.load(handle)
    cam = selection["cam"] if args.pseudo_label_cam == "auto" else args.pseudo_label_cam
    threshold = selection["threshold"] if args.cam_threshold == "sweep" else args.cam_threshold
    return cam, threshold


def pseudo_stage(args, accelerator, dataset, class_names, results):
    """CAMs of every training image -> thresholded (and CRF-refined) pseudo-label PNGs, sharded over processes."""
    train = split(dataset, args.train_split)
    model = WeakTrForCAM.from_pretrained(os.path.join(args.output_dir, "cam")).to(accelerator.device)
    cam, threshold = pseudo_label_choice(args)
    crf = None if args.no_crf else CRF_PRESETS[args.crf]
    accelerator.print(f"Pseudo-labels from {cam} at threshold {threshold:.2f}, scales "
                      f"{tuple(args.cam_scales)}, flip {args.cam_flip}, CRF {'off' if crf is None else args.crf}")  # fmt: skip
    # The step-2 stage trains on `pseudo_labels`; with the CRF the maps before it go to `pseudo_labels_nocrf`.
    folders = {"pseudo_labels": os.path.join(args.output_dir, "pseudo_labels")}
    if crf is not None:
        folders["pseudo_labels_nocrf"] = os.path.join(args.output_dir, "pseudo_labels_nocrf")
    summary = write_pseudo_labels(
        model, train, folders["pseudo_labels"], scales=args.cam_scales, flip=args.cam_flip, threshold=threshold,
        crf=crf, process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        cam=cam, show_progress=accelerator.is_local_main_process, uncrf_output_dir=folders.get("pseudo_labels_nocrf"),
    )  # fmt: skip
    # Every image exactly once across processes: check the shards' union before anything trains on it.
    shards = gather_object([(accelerator.process_index, summary.written, summary.skipped)])
    done = [sample_id for _, written, skipped in shards for sample_id in written + skipped]
    if len(done) != len(train) or len(set(done)) != len(done):
        raise RuntimeError(f"Pseudo-labels: the shards covered {len(set(done))} distinct of {len(train)} images "
                           f"with {len(done) - len(set(done))} duplicates.")  # fmt: skip
    results["pseudo_labels_written_per_process"] = [len(written) for _, written, _ in sorted(shards)]
    accelerator.print(f"Pseudo-labels: wrote {sum(results['pseudo_labels_written_per_process'])} "
                      f"({results['pseudo_labels_written_per_process']} per process), {len(done)} in all")  # fmt: skip
    results.update(pseudo_label_threshold=threshold, pseudo_label_cam=cam)
    if "semantic_mask" not in train.column_names or train[0]["semantic_mask"] is None:
        accelerator.print("The training split has no ground-truth masks: pseudo-labels and CAMs are not scored.")
        return
    if accelerator.is_main_process:
        scored = {"pseudo_labels": "pseudo_label_crf_miou" if crf else "pseudo_label_miou",
                  "pseudo_labels_nocrf": "pseudo_label_miou"}  # fmt: skip
        for name, folder in folders.items():
            results[scored[name]] = evaluate_pseudo_labels(train, folder, len(class_names) + 1)["mean_iou"]
    subset = train.select(range(min(args.cam_eval_samples, len(train))))
    # Each CAM at its own best threshold of the sweep (or at the given threshold), with the generation's scales.
    thresholds = args.cam_sweep_thresholds if args.cam_threshold == "sweep" else [args.cam_threshold]
    scores = evaluate_cams(model, subset, cams=CAM_NAMES, thresholds=thresholds, scales=args.cam_scales,
                           flip=args.cam_flip, accelerator=accelerator)  # fmt: skip
    for name, score in scores.items():
        results[f"{name}_miou"], results[f"{name}_threshold"] = score["mean_iou"], score["threshold"]
    results["cam_eval_samples"] = len(subset)


def seg_stage(args, accelerator, dataset, class_names, results):
    """Step 2: train the segmenter on the pseudo-labels (gradient clipping on), save it with its processor."""
    train = pseudo_label_dataset(split(dataset, args.train_split), os.path.join(args.output_dir, "pseudo_labels"))
    model = WeakTrForSemanticSegmentation(
        model_config(args, segmentation_id2label(class_names), args.seg_image_size)
    )
    if args.seg_init == "backbone":
        load_timm_backbone(model, args.backbone)
    elif args.seg_init == "cam":
        cam_model = WeakTrForCAM.from_pretrained(os.path.join(args.output_dir, "cam"))
        load_timm_backbone(model, encoder_state_from_cam(cam_model), strict=False)
    processor = WeakTrImageProcessor(size={"height": args.seg_image_size, "width": args.seg_image_size},
                                     size_divisor=args.patch_size)  # fmt: skip
    transform = SegmentationTrainTransform(crop_size=args.seg_crop_size, base_size=args.seg_base_size)
    loader = make_loader(train, transform, SegmentationCollator(), args.seg_per_device_train_batch_size,
                         args.seed, args.dataloader_num_workers)  # fmt: skip
    max_steps, _ = training_steps(
        loader, args.seg_num_train_epochs, args.seg_max_train_steps, args.gradient_accumulation_steps
    )
    optimizer = build_seg_optimizer(model, args.seg_learning_rate, args.seg_encoder_lr_scale)
    scheduler = build_scheduler("poly", optimizer, max_steps * accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start = time.time()
    train_model(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=max_steps,
        checkpoint_dir=os.path.join(args.output_dir, "checkpoints", "seg"),
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, log_prefix="seg", logging_steps=args.logging_steps,
    )  # fmt: skip
    save_pretrained_atomic(accelerator.unwrap_model(model), os.path.join(args.output_dir, "seg"), processor,
                           accelerator.is_main_process)  # fmt: skip
    release_training_state(accelerator)
    results.update(seg_train_seconds=round(time.time() - start, 1), seg_train_steps=max_steps)


def eval_stage(args, accelerator, dataset, class_names, results):
    """Segmentation mIoU on the validation split, single scale and multi-scale + flip; PNGs of a few images."""
    val = split(dataset, args.val_split)
    model = WeakTrForSemanticSegmentation.from_pretrained(os.path.join(args.output_dir, "seg")).to(accelerator.device)
    figures = os.path.join(args.output_dir, "figures")
    os.makedirs(figures, exist_ok=True)

    def save_prediction(index, example, prediction):
        if index < args.num_visualizations:
            panel = side_by_side([example["image"], colorize_mask(prediction), colorize_mask(example["semantic_mask"])],
                                 titles=["image", "prediction", "ground truth"])  # fmt: skip
            panel.save(os.path.join(figures, f"prediction_{example['id']}.png"))

    common = dict(window_size=args.window_size, window_stride=args.window_stride, accelerator=accelerator,
                  max_samples=args.eval_samples)  # fmt: skip
    single = evaluate_segmentation(model, val, scales=(1.0,), flip=False, **common)
    multi = evaluate_segmentation(model, val, scales=args.eval_scales, flip=True, on_prediction=save_prediction,
                                  **common)  # fmt: skip
    results.update(
        seg_val_miou=single["mean_iou"], seg_val_miou_ms_flip=multi["mean_iou"],
        seg_val_pixel_accuracy=single["overall_accuracy"],
        seg_val_per_class_iou={name: _float(iou) for name, iou in zip(["background", *class_names],
                                                                         multi["per_category_iou"])},
    )  # fmt: skip
    if accelerator.is_main_process:
        save_cam_overlays(args, split(dataset, args.train_split), figures)


def save_cam_overlays(args, train, figures):
    """Image | coarse CAM | fine CAM of the first present class, for a few training images."""
    cam_dir = os.path.join(args.output_dir, "cam")
    if not os.path.isdir(cam_dir):
        return
    model = WeakTrForCAM.from_pretrained(cam_dir)
    processor = WeakTrImageProcessor(do_resize=False)
    for example in train.select(range(min(args.num_visualizations, len(train)))):
        if not example["labels"]:
            continue
        pixel_values = processor(example["image"], return_tensors="pt").pixel_values
        panels, titles = [example["image"]], ["image"]
        for cam in ("coarse_cam", "fine_cam"):
            maps = generate_cams(model, pixel_values, [example["labels"]], scales=args.cam_scales,
                                 flip=args.cam_flip, cam=cam)  # fmt: skip
            panels.append(overlay_cam(example["image"], maps[0, example["labels"][0]].numpy()))
            titles.append(cam)
        side_by_side(panels, titles=titles).save(os.path.join(figures, f"cam_{example['id']}.png"))


def _float(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ---------------------------------------------------------------------------------------------------------------------
# Results and main
# ---------------------------------------------------------------------------------------------------------------------

TABLE_ROWS = (
    ("colour-threshold baseline (val, best threshold)", "trivial_baseline_miou"),
    ("coarse CAM (train subset)", "coarse_cam_miou"),
    ("fine CAM (train subset)", "fine_cam_miou"),
    ("cross-attention CAM (train subset)", "cross_attention_miou"),
    ("pseudo-labels, no CRF (train)", "pseudo_label_miou"),
    ("pseudo-labels, CRF (train)", "pseudo_label_crf_miou"),
    ("segmentation, single scale (val)", "seg_val_miou"),
    ("segmentation, multi-scale + flip (val)", "seg_val_miou_ms_flip"),
)


def results_table(results):
    lines = ["| result | mIoU |", "|---|---|"]
    for label, key in TABLE_ROWS:
        if results.get(key) is not None:
            lines.append(f"| {label} | {100 * results[key]:.1f} |")
    return "\n".join(lines)


def write_model_card(folder, repo_id, results, command, dataset_name):
    """README.md of the pushed folder: the measured results table and the exact command that produced them."""
    config = WeakTrConfig.from_pretrained(folder)
    segmenter = "WeakTrForSemanticSegmentation" in (config.architectures or [])
    card = render_model_card(
        "trained", pipeline_tag="image-segmentation" if segmenter else "image-classification",
        dataset=dataset_name, model_kind="segmenter (step 2)" if segmenter else "CAM model (step 1)",
        description=f"A `{(config.architectures or ['WeakTr'])[0]}` with {config.num_hidden_layers} layers of width "
        f"{config.hidden_size} and patch {config.patch_size}, {config.num_labels} labels.",
        results_table=results_table(results), command=command, repo_id=repo_id,
        classes=", ".join(f"{i}: {name}" for i, name in sorted(config.id2label.items())),
    )  # fmt: skip
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


def main(argv=None):
    args = parse_args(argv)
    # Several processes but no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU machine): Accelerate
    # only sets up CPU (gloo) process groups when told to use the CPU.
    distributed_without_cuda = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=distributed_without_cuda,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )  # fmt: skip
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])  # fmt: skip
    if args.preset == "demo" and args.dataset_path == "synthetic":
        accelerator.print("weaktr demo: offline run on the built-in synthetic dataset with a small ViT trained from "
                          "scratch (no ImageNet weights); a smoke test of the whole recipe, not the paper's setting.")  # fmt: skip
    else:
        accelerator.print(f"weaktr: preset {args.preset} on {args.dataset_path}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.with_tracking:
        accelerator.init_trackers("weaktr", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in vars(args).items()})  # fmt: skip

    dataset = load_data(args)
    class_names = get_class_names(dataset)
    results_path = os.path.join(args.output_dir, "all_results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as handle:
            results = json.load(handle)
    results.update(preset=args.preset, dataset=str(args.dataset_path), command="accelerate launch examples/train.py "
                   + " ".join(sys.argv[1:] if argv is None else argv))  # fmt: skip

    stages = STAGES if args.stage == "all" else (args.stage,)
    runners = {"cam": cam_stage, "pseudo": pseudo_stage, "seg": seg_stage, "eval": eval_stage}
    for stage in stages:
        start = time.time()
        accelerator.print(f"== stage {stage} ==")
        runners[stage](args, accelerator, dataset, class_names, results)
        results[f"{stage}_stage_seconds"] = round(time.time() - start, 1)
        if accelerator.is_main_process:
            write_json_atomic(results_path, results)
    if "eval" in stages and args.dataset_path == "synthetic" and accelerator.is_main_process:
        results["trivial_baseline_miou"] = trivial_baseline_miou(split(dataset, args.val_split))
        write_json_atomic(results_path, results)

    if accelerator.is_main_process:
        accelerator.print(results_table(results))
        accelerator.print(f"Results: {results_path}")
        if args.push_to_hub:
            seg_folder = os.path.join(args.output_dir, "seg")
            folder = seg_folder if os.path.isdir(seg_folder) else os.path.join(args.output_dir, "cam")
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            dataset_name = "synthetic" if args.dataset_path == "synthetic" else os.path.basename(
                os.path.normpath(str(args.dataset_path)))  # fmt: skip
            write_model_card(folder, repo_id, results, results["command"], dataset_name)
            push_folder_to_hub(folder, repo_id, token=args.hub_token)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
