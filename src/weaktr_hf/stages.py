"""The four stages of WeakTr's recipe, each reading its inputs from the run folder and writing its outputs there.

    cam     step 1: train WeakTrForCAM from image-level labels; keep the epoch with the best CAM mIoU on a train subset
            (without masks: the lowest held-out classification loss, then the CAM and threshold by Otsu's rule)
    pseudo  multi-scale + flip CAMs -> background threshold -> dense CRF -> one pseudo-label PNG per training image
    seg     step 2: train WeakTrForSemanticSegmentation on the pseudo-labels with the gradient-clipping loss
    eval    predict the validation split (PNGs in predictions/, figures), score it where it has masks

Each stage takes the resolved recipe (`weaktr_hf.recipes`), an `accelerate.Accelerator`, the dataset, its class names
and the run's results dict, which it updates. `weaktr_hf.train` (the `weaktr-train` command) and
`examples/train.py` run them in order.
"""

import argparse
import json
import logging
import math
import os
import shutil
import time

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from .configuration_weaktr import ENCODER_VARIANTS, WeakTrConfig
from .crf import COCO_PSEUDO_LABEL_CRF, COCO_SEGMENTATION_CRF, SEGMENTATION_CRF, VOC_PSEUDO_LABEL_CRF
from .data import (
    SYNTHETIC_CONFIGURATIONS,
    CAMCollator,
    CAMTrainTransform,
    SegmentationCollator,
    SegmentationTrainTransform,
    check_class_names,
    get_class_names,
    load_wsss_dataset,
    trivial_baseline_miou,
)
from .data.coco import is_coco_root
from .data.voc import find_voc_root
from .evaluation import evaluate_cams, evaluate_segmentation
from .image_processing_weaktr import WeakTrImageProcessor, evaluation_processor, pil_image_to_uint8
from .inference import generate_cams
from .labels import foreground_id2label, segmentation_id2label
from .modeling_weaktr import WeakTrForCAM, WeakTrForSemanticSegmentation
from .predict import save_predict_settings
from .pseudo_labels import evaluate_pseudo_labels, pseudo_label_dataset, stale_pseudo_labels, write_pseudo_labels
from .recipes import CAM_NAMES, DATASET_TUNED, cam_scheduler, epochs_for, requested_stages
from .selection import (
    CLASSIFICATION_RULE, choose_cam_without_masks, heldout_classification_loss, mask_selection_record,
    threshold_for_cam,
)  # fmt: skip
from .timm_backbone import PRETRAINED_BACKBONES, load_timm_backbone, prepare_timm_backbone
from .training import (
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
from .visualization import (
    FIGURE_MIN_SIDE, bar_chart, colorize_mask, overlay_cam, save_label_png, side_by_side, upscale,
)  # fmt: skip

logger = logging.getLogger("weaktr")

# Dense-CRF parameter sets named by the recipes' `crf` (pseudo-labels) and `eval_crf` (evaluation) options.
PSEUDO_LABEL_CRFS = {"voc12": VOC_PSEUDO_LABEL_CRF, "coco14": COCO_PSEUDO_LABEL_CRF}
EVAL_CRFS = {"voc12": SEGMENTATION_CRF, "coco14": COCO_SEGMENTATION_CRF}

# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def load_data(args):
    if args.dataset_path == "synthetic":
        options = {"num_classes": args.synthetic_num_classes, **SYNTHETIC_CONFIGURATIONS[args.synthetic_config]}
        dataset = load_wsss_dataset(
            "synthetic", image_size=args.synthetic_image_size, num_train=args.synthetic_num_train,
            num_val=args.synthetic_num_val, seed=args.seed, **options,
        )  # fmt: skip
    else:
        path = os.path.expanduser(str(args.dataset_path))
        if os.path.isdir(path) and find_voc_root(path) is not None:
            options = {"labels_from": args.voc_labels_from, "on_bad_sample": args.on_bad_sample}
        elif os.path.isdir(path) and is_coco_root(path):
            options = {"id_layout": args.coco_id_layout, "on_bad_sample": args.on_bad_sample}
        else:
            options = user_data_kwargs(args)
        dataset = with_validation_split(load_wsss_dataset(args.dataset_path, **options), args)
    if args.image_labels_file:
        dataset = with_image_labels_file(dataset, args.image_labels_file)
    return dataset


def with_image_labels_file(dataset, path):
    """Replace each row's image-level labels by those of a .npy dict {image id: multi-hot vector} (the authors'
    `voc12/cls_labels.npy` / `coco/cls_labels.npy`, datasets.py:22-31); ids may carry a `.jpg` suffix there."""
    table = np.load(path, allow_pickle=True).item()
    table = {str(key).removesuffix(".jpg"): np.asarray(value) for key, value in table.items()}
    num_classes = len(get_class_names(dataset))

    def relabel(example):
        vector = table.get(str(example["id"]))
        if vector is None:
            raise KeyError(f"--image_labels_file {path} has no labels for image {example['id']!r}.")
        if vector.shape != (num_classes,):
            raise ValueError(
                f"--image_labels_file {path}: image {example['id']!r} has a label vector of shape {vector.shape}, "
                f"the dataset has {num_classes} classes (check --coco_id_layout)."
            )
        return {"labels": np.flatnonzero(vector).tolist()}

    return dataset.map(relabel, desc="image-level labels from " + os.path.basename(path))


# ---------------------------------------------------------------------------------------------------------------------
# Your own data: column names, class names, a validation split carved from train
# ---------------------------------------------------------------------------------------------------------------------


def read_class_names(values):
    """`--class_names`: the names themselves, or one existing text file holding one name per line."""
    if values is None:
        return None
    if len(values) == 1 and os.path.isfile(values[0]):
        with open(values[0], encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
        if not names:
            raise ValueError(f"--class_names file {values[0]} holds no class name (one name per line expected).")
        return check_class_names(names, f"--class_names file {values[0]}")
    return check_class_names(list(values), "--class_names")


def user_data_kwargs(args):
    """Keyword arguments of `load_wsss_dataset` for a folder / saved / Hub dataset: only the flags that were given."""
    kwargs = {"on_bad_sample": args.on_bad_sample}
    for key, flag in (("image_column", "image_column_name"), ("labels_column", "labels_column_name"),
                      ("mask_column", "mask_column_name")):  # fmt: skip
        if getattr(args, flag):
            kwargs[key] = getattr(args, flag)
    if args.class_names:
        kwargs["class_names"] = read_class_names(args.class_names)
    return kwargs


def with_validation_split(dataset, args):
    """The dataset with a `--val_split` split: 'validation' renamed (ImageFolder names a `val/` folder so), or
    `--validation_split_percentage` of the training split held out (seeded), as transformers' examples do."""
    if args.val_split in dataset:
        return dataset
    if args.val_split == "val" and "validation" in dataset:
        args.val_split = "validation"
        return dataset
    train = split(dataset, args.train_split)
    fraction = args.validation_split_percentage / 100
    if not 0 < fraction < 1 or round(fraction * len(train)) < 1 or round(fraction * len(train)) >= len(train):
        raise ValueError(
            f"The dataset has no split {args.val_split!r} (it has {sorted(dataset)}) and --validation_split_percentage "
            f"{args.validation_split_percentage} of {len(train)} training images leaves no image on one side; name "
            "a validation split with --val_split or choose a percentage in (0, 100)."
        )
    parts = train.train_test_split(test_size=fraction, seed=args.seed)
    logger.info("No %r split: held out %d of %d training images (%.1f%%) as the validation split.", args.val_split,
                len(parts["test"]), len(train), args.validation_split_percentage)  # fmt: skip
    return datasets.DatasetDict({**dataset, args.train_split: parts["train"], args.val_split: parts["test"]})


def rows_with_masks(dataset):
    """Indices of the samples that have a ground-truth mask."""
    if "semantic_mask" not in dataset.column_names:
        return []
    masks = dataset.select_columns(["semantic_mask"]).cast_column("semantic_mask", datasets.Image(decode=False))
    return [index for index, mask in enumerate(masks["semantic_mask"]) if mask is not None]


def has_masks(dataset):
    """Whether every sample of a split has a ground-truth mask (a mask-free recipe runs otherwise)."""
    if "semantic_mask" not in dataset.column_names or not len(dataset):
        return False
    masks = dataset.select_columns(["semantic_mask"]).cast_column("semantic_mask", datasets.Image(decode=False))
    return all(mask is not None for mask in masks["semantic_mask"])


def split(dataset, name):
    if name not in dataset:
        raise KeyError(f"The dataset has no split {name!r} (it has {sorted(dataset)}); set --train_split/--val_split.")
    return dataset[name]


def model_config(args, id2label, image_size, layer_norm_eps=None, **encoder_fields):
    """The config of either step; `encoder_fields` override the encoder's (step 2 on another backbone)."""
    fields = dict(
        image_size=image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, drop_path_rate=args.drop_path_rate,
        aaf_reduction=args.aaf_reduction, aaf_feat_reduction=args.aaf_feat_reduction,
        decoder_hidden_size=args.decoder_hidden_size, decoder_num_hidden_layers=args.decoder_num_hidden_layers,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        decoder_intermediate_size=args.decoder_intermediate_size,
        decoder_hidden_dropout_prob=args.decoder_hidden_dropout_prob,
        decoder_class_embedding_std=args.decoder_class_embedding_std,
        use_gradient_clipping=args.use_gradient_clipping, clip_start_value=args.clip_start_value,
        clip_window_size=args.clip_window_size, loss_average=args.loss_average,
        loss_class_balance=args.loss_class_balance, id2label=id2label,
        layer_norm_eps=layer_norm_eps or (1e-6 if args.backbone else 1e-5),
        fine_cam_scale=args.fine_cam_scale or 1.0,
    )  # fmt: skip
    return WeakTrConfig(**{**fields, **encoder_fields})


def seg_model_config(args, id2label):
    """Step 2's config: the encoder with the block layout of --seg_encoder and its MLP width."""
    return model_config(
        args, id2label, args.seg_image_size, args.seg_layer_norm_eps,
        intermediate_size=args.seg_intermediate_size or args.intermediate_size, **ENCODER_VARIANTS[args.seg_encoder],
    )  # fmt: skip


def reads_timm_config(source, arch=None):
    """Whether a backbone's encoder config is read from timm (`weaktr_hf.timm_backbone.prepare_timm_backbone`): a
    folder saved by timm, a weights file with `--backbone_arch`, or a timm name other than the paper's (DeiT names
    and the authors' step-2 backbones keep the recipe's encoder and their documented loading)."""
    if not source:
        return False
    if arch or os.path.isdir(str(source)):
        return True
    name = str(source)
    return not os.path.isfile(name) and name not in PRETRAINED_BACKBONES and not name.startswith("deit_")


def encoder_state_from_cam(cam_model):
    """The step-1 encoder in timm layout with one [CLS] token (the mean of the class tokens), to start step 2 from."""
    state = {key: value for key, value in cam_model.weaktr.state_dict().items()}
    num_classes = cam_model.config.num_labels
    state["cls_token"] = state["cls_token"].mean(dim=1, keepdim=True)
    if "pos_embed" in state:
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([pos[:, :num_classes].mean(dim=1, keepdim=True), pos[:, num_classes:]], dim=1)
    return state


def make_loader(dataset, transform, collator, batch_size, seed, num_workers, shuffle=True, drop_last=False):
    return DataLoader(
        SeededTransformDataset(dataset, transform, seed=seed), batch_size=batch_size, shuffle=shuffle,
        collate_fn=collator, num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
    )  # fmt: skip


def training_steps(loader, epochs, max_steps, accumulation):
    """(updates, updates per epoch) of a loader; called on the prepared (sharded) loader, so both count updates of
    the global batch, the same on any number of processes."""
    if len(loader) == 0:
        raise ValueError("The training split holds fewer images than one global batch (with --cam_drop_last); use a "
                         "smaller batch or more images.")  # fmt: skip
    steps_per_epoch = math.ceil(len(loader) / accumulation)
    return max_steps or epochs * steps_per_epoch, steps_per_epoch


def reset_cam_head_to_pytorch_init(model):
    """PyTorch's default init for the layers an ImageNet checkpoint does not hold (the CAM conv head, the attention
    fusion), as the authors' models keep them (models.py:24-26, 41; AAF.py:12-22)."""
    for module in [model.head, *model.adaptive_attention_fusion.modules()]:
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.reset_parameters()


def read_ids(path):
    with open(path, encoding="utf-8") as handle:
        return [line.split()[0] for line in handle if line.strip()]


def select_ids(dataset, ids, what):
    """The rows of `dataset` whose id is in `ids`, in the order of `ids`; a clear error for ids it does not hold."""
    position = {sample_id: index for index, sample_id in enumerate(dataset["id"])}
    missing = [sample_id for sample_id in ids if sample_id not in position]
    if missing:
        raise ValueError(f"{what}: {len(missing)} of {len(ids)} ids are not in the dataset, e.g. {missing[:3]}.")
    return dataset.select([position[sample_id] for sample_id in ids])


def coco_annotation_order(dataset, split_name):
    """Image ids of a COCO split in the order of its annotation file (the order of the authors' id lists)."""
    from weaktr_hf.data.coco import coco_annotation_file
    from weaktr_hf.data.schema import get_metadata

    root = get_metadata(dataset).get("root")
    if not root:
        raise ValueError("--cam_eval_order annotation_file needs a COCO dataset loaded from its folder.")
    with open(coco_annotation_file(root, split_name), encoding="utf-8") as handle:
        images = json.load(handle)["images"]
    known = set(dataset["id"])
    ordered = [f"{image['id']:012d}" for image in images]  # the loader's ids
    return [sample_id for sample_id in ordered if sample_id in known]


def cam_selection_subset(args, dataset):
    """The images that pick the best step-1 epoch: VOC `train` (1,464) or the first 1,250 COCO train images in
    annotation-file order in the paper presets; by default the first `cam_eval_samples` of the training split."""
    name = args.cam_eval_split or args.train_split
    images = split(dataset, name)
    if args.cam_eval_ids:
        return select_ids(images, read_ids(args.cam_eval_ids), "--cam_eval_ids")
    if args.cam_eval_order == "annotation_file":
        ids = coco_annotation_order(images, name)
        if args.cam_eval_samples is not None:
            ids = ids[: args.cam_eval_samples]
        return select_ids(images, ids, "--cam_eval_order annotation_file")
    if args.cam_eval_subset == "with_masks":  # own data: whichever images have a mask (all, some or none)
        masked = rows_with_masks(images)
        images = images.select(masked) if masked else images
    count = len(images) if args.cam_eval_samples is None else min(args.cam_eval_samples, len(images))
    return images.select(range(count))


def selection_thresholds(args):
    if args.cam_selection_thresholds:
        return tuple(args.cam_selection_thresholds)
    return tuple(args.cam_sweep_thresholds) if args.cam_threshold == "sweep" else (args.cam_threshold,)


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


def cam_stage(args, accelerator, dataset, class_names, results):
    """Step 1: train the CAM model; after each epoch score the fine CAM on a train subset, keep the best epoch."""
    train = split(dataset, args.train_split)
    if args.cam_model_name_or_path:
        model = WeakTrForCAM.from_pretrained(args.cam_model_name_or_path)
    elif reads_timm_config(args.backbone, args.backbone_arch):
        # Any supported timm backbone (DINOv3, DINOv2 with registers, EVA-02, DeiT-III, any size): the encoder's
        # config is read from the timm model; the recipe sets the rest.
        backbone = prepare_timm_backbone(args.backbone, "cam", arch=args.backbone_arch)
        fields = {k: v for k, v in backbone.config_fields.items() if k not in ("image_size", "layer_norm_eps")}
        model = WeakTrForCAM(model_config(args, foreground_id2label(class_names), args.cam_image_size,
                                          backbone.config_fields["layer_norm_eps"], **fields))  # fmt: skip
        if args.cam_head_init == "pytorch":
            reset_cam_head_to_pytorch_init(model)
        load_timm_backbone(model, backbone.model)
    else:
        model = WeakTrForCAM(
            model_config(args, foreground_id2label(class_names), args.cam_image_size, args.layer_norm_eps)
        )
        if args.cam_head_init == "pytorch":
            reset_cam_head_to_pytorch_init(model)
        if args.backbone:
            report = load_timm_backbone(model, args.backbone)
            logger.info("Backbone %s: %d tensors loaded, unused %s", args.backbone, len(report.loaded_keys),
                        report.unused_keys)  # fmt: skip
    # size_divisor = the patch size: post-processing maps each CAM cell to size_divisor pixels.
    processor = WeakTrImageProcessor(size={"height": args.cam_image_size, "width": args.cam_image_size},
                                     size_divisor=model.config.patch_size)  # fmt: skip
    transform = CAMTrainTransform(args.cam_image_size, augment=args.cam_augment)
    loader = make_loader(train, transform, CAMCollator(len(class_names)), args.per_device_train_batch_size,
                         args.seed, args.dataloader_num_workers, drop_last=args.cam_drop_last)  # fmt: skip
    optimizer = build_cam_optimizer(model, args.learning_rate, args.weight_decay,
                                    decay_all_parameters=args.decay_all_parameters)  # fmt: skip
    model, prepared_optimizer, loader = accelerator.prepare(model, optimizer, loader)
    epochs = epochs_for(math.ceil(len(loader) / args.gradient_accumulation_steps), args.num_train_epochs,
                        args.target_train_updates, args.max_train_epochs)  # fmt: skip
    max_steps, steps_per_epoch = training_steps(loader, epochs, args.max_train_steps, args.gradient_accumulation_steps)
    # Not prepared: one step per update of the global batch on any number of processes.
    scheduler = cam_scheduler(argparse.Namespace(**{**vars(args), "num_train_epochs": epochs}), optimizer, max_steps,
                              steps_per_epoch)  # fmt: skip
    optimizer = prepared_optimizer

    thresholds = selection_thresholds(args)
    selection_subset = cam_selection_subset(args, dataset)
    selection_passes = dict(scales=tuple(args.cam_eval_scales or (1.0,)), flip=args.cam_eval_flip,
                            early_stop=args.cam_selection_early_stop)  # fmt: skip
    state = TrainState()

    candidates = CAM_NAMES if args.pseudo_label_cam == "auto" else (args.pseudo_label_cam,)
    # Without masks on the selection subset, the epoch is kept by held-out classification (mask-free block below).
    use_masks = has_masks(selection_subset)
    heldout = None if use_masks else heldout_subset(args, dataset)

    def on_epoch_end(epoch, train_state):
        unwrapped = accelerator.unwrap_model(model)
        if not use_masks:
            keep_epoch_by_classification(args, accelerator, unwrapped, processor, heldout, epoch, train_state)
            model.train()
            return
        all_scores = evaluate_cams(unwrapped, selection_subset, cams=candidates, thresholds=thresholds,
                                   accelerator=accelerator, show_progress=False, **selection_passes)  # fmt: skip
        cam = max(candidates, key=lambda name: all_scores[name]["mean_iou"])
        scores = all_scores[cam]
        accelerator.log({f"cam/selection_miou_{name}": value["mean_iou"] for name, value in all_scores.items()}
                        | {"cam/selection_miou": scores["mean_iou"], "cam/epoch": epoch},
                        step=train_state.completed_steps)  # fmt: skip
        improved = scores["mean_iou"] > train_state.best_metric
        accelerator.print(f"epoch {epoch}: " + ", ".join(f"{name} {value['mean_iou']:.3f} (t={value['threshold']:.2f})"
                          for name, value in all_scores.items()) + f" mIoU on {len(selection_subset)} images"
                          + (f"; best so far with {cam}, saved" if improved else ""))  # fmt: skip
        if improved:
            train_state.best_metric, train_state.best_epoch = scores["mean_iou"], epoch
            save_pretrained_atomic(unwrapped, os.path.join(args.output_dir, "cam"), processor,
                                   accelerator.is_main_process)  # fmt: skip
            if accelerator.is_main_process:
                # Every scored CAM's own best threshold: a threshold is only ever used for the CAM it was swept for.
                write_json_atomic(os.path.join(args.output_dir, "cam_selection.json"),
                                  {**mask_selection_record(epoch, all_scores, cam), "rule": "train_subset_cam_miou"})
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
                   cam_train_epochs=math.ceil(max_steps / steps_per_epoch), cam_best_epoch=state.best_epoch)  # fmt: skip
    if use_masks:
        results.update(cam_selection_rule="train_subset_cam_miou", cam_selection_miou=state.best_metric)
        return
    results.update(cam_selection_rule=CLASSIFICATION_RULE, cam_selection_heldout_loss=-state.best_metric,
                   cam_selection_heldout_split=args.val_split, cam_selection_heldout_samples=len(heldout))  # fmt: skip
    if args.cam_threshold != "sweep" and args.pseudo_label_cam != "auto":
        return  # the pseudo-labels use the given CAM and threshold: no choice to make, none recorded
    choose_pseudo_labels_without_masks(args, accelerator, selection_subset, candidates, thresholds, state, results)


# ---------------------------------------------------------------------------------------------------------------------
# No masks: the step-1 epoch, the pseudo-label CAM and threshold by the rules of weaktr_hf.selection
# ---------------------------------------------------------------------------------------------------------------------


def heldout_subset(args, dataset):
    """Up to `--cam_eval_samples` images of the validation split, whose image-level labels score the step-1 epochs."""
    heldout = split(dataset, args.val_split)
    return heldout.select(range(min(args.cam_eval_samples or len(heldout), len(heldout))))


def keep_epoch_by_classification(args, accelerator, model, processor, heldout, epoch, train_state):
    """Mask-free epoch criterion: keep the epoch of the lowest held-out multi-label classification loss."""
    loss = heldout_classification_loss(model, heldout, args.cam_image_size)
    accelerator.log({"cam/heldout_loss": loss, "cam/epoch": epoch}, step=train_state.completed_steps)
    improved = -loss > train_state.best_metric
    accelerator.print(f"epoch {epoch}: held-out classification loss {loss:.4f} on {len(heldout)} "
                      f"{args.val_split} images" + ("; best so far, saved" if improved else ""))  # fmt: skip
    if improved:
        train_state.best_metric, train_state.best_epoch = -loss, epoch
        save_pretrained_atomic(model, os.path.join(args.output_dir, "cam"), processor, accelerator.is_main_process)
        if accelerator.is_main_process:
            write_json_atomic(os.path.join(args.output_dir, "cam_selection.json"),
                              {"epoch": epoch, "epoch_rule": CLASSIFICATION_RULE, "heldout_loss": loss})  # fmt: skip


def choose_pseudo_labels_without_masks(args, accelerator, subset, candidates, thresholds, state, results):
    """The mask-free rule of `weaktr_hf.selection` (Otsu threshold, CAM of the most agreeing passes) on the kept
    model's CAMs of the train subset, at the pseudo-labels' scales; written to cam_selection.json next to the epoch."""
    model = WeakTrForCAM.from_pretrained(os.path.join(args.output_dir, "cam")).to(accelerator.device)
    choice = choose_cam_without_masks(model, subset, cams=candidates, scales=args.cam_scales, flip=args.cam_flip,
                                      show_progress=accelerator.is_local_main_process)  # fmt: skip
    accelerator.print(f"Mask-free choice (Otsu threshold, pass agreement; {choice['num_images']} train images): "
                      f"{choice['cam']} at "
                      f"threshold {choice['threshold']:.2f}; " + ", ".join(
                          f"{name} t={value['threshold']:.2f} pass agreement {value['pass_agreement']:.3f}"
                          for name, value in choice["per_cam"].items()))  # fmt: skip
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, "cam_selection.json"),
                          {"epoch": state.best_epoch, "epoch_rule": CLASSIFICATION_RULE,
                           "heldout_loss": -state.best_metric, **choice})  # fmt: skip
    accelerator.wait_for_everyone()
    results.update(cam_choice_rule=choice["rule"], cam_choice=choice["cam"], cam_choice_threshold=choice["threshold"])


def pseudo_label_choice(args):
    """(CAM name, background threshold) for the pseudo-labels: as given, or as picked on the train subset."""
    if args.cam_threshold != "sweep" and args.pseudo_label_cam != "auto":
        return args.pseudo_label_cam, args.cam_threshold
    path = os.path.join(args.output_dir, "cam_selection.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run --stage cam first, or give --cam_threshold and a CAM name.")
    with open(path, encoding="utf-8") as handle:
        selection = json.load(handle)
    if "cam" not in selection:
        raise ValueError(f"{path} holds no CAM choice (the cam stage stopped early?); rerun --stage cam.")
    cam = selection["cam"] if args.pseudo_label_cam == "auto" else args.pseudo_label_cam
    if args.cam_threshold != "sweep":
        return cam, args.cam_threshold
    # Both rules record each scored CAM's own threshold; a threshold swept for another CAM is never used.
    return cam, threshold_for_cam(selection, cam, path)


def pseudo_label_choice_rule(args):
    """How the pseudo-label CAM and threshold were chosen, for all_results.json."""
    if args.cam_threshold != "sweep" and args.pseudo_label_cam != "auto":
        return "given"
    with open(os.path.join(args.output_dir, "cam_selection.json"), encoding="utf-8") as handle:
        return json.load(handle).get("rule", "train_subset_cam_miou")


def pseudo_stage(args, accelerator, dataset, class_names, results):
    """CAMs of every training image -> thresholded (and CRF-refined) pseudo-label PNGs, sharded over processes."""
    train = split(dataset, args.train_split)
    model = WeakTrForCAM.from_pretrained(os.path.join(args.output_dir, "cam")).to(accelerator.device)
    cam, threshold = pseudo_label_choice(args)
    crf = None if args.no_crf else PSEUDO_LABEL_CRFS[args.crf]
    if accelerator.is_main_process:  # weaktr-predict on cam/ then makes the run's pseudo-labels by default
        save_predict_settings(os.path.join(args.output_dir, "cam"), cam=cam, cam_threshold=threshold,
                              scales=list(args.cam_scales), flip=args.cam_flip, crf=None if args.no_crf else args.crf)
    accelerator.print(f"Pseudo-labels from {cam} at threshold {threshold:.2f}, scales "
                      f"{tuple(args.cam_scales)}, flip {args.cam_flip}, CRF {'off' if crf is None else args.crf}")  # fmt: skip
    # The step-2 stage trains on `pseudo_labels`; with the CRF the maps before it go to `pseudo_labels_nocrf`.
    folders = {"pseudo_labels": os.path.join(args.output_dir, "pseudo_labels")}
    if crf is not None:
        folders["pseudo_labels_nocrf"] = os.path.join(args.output_dir, "pseudo_labels_nocrf")
    # A rerun of this stage with other settings (another threshold, CAM, CRF or step-1 model) makes the labels again;
    # one with the same settings resumes, skipping the finished images.
    if accelerator.is_main_process:
        for name, folder in folders.items():
            reason = stale_pseudo_labels(folder, model, scales=args.cam_scales, flip=args.cam_flip, threshold=threshold,
                                         crf=crf, cam=cam, crf_applied=name == "pseudo_labels")  # fmt: skip
            if reason:
                accelerator.print(f"{folder}: {reason}; making the pseudo-labels again.")
                shutil.rmtree(folder)
    accelerator.wait_for_everyone()
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
    results.update(pseudo_label_threshold=threshold, pseudo_label_cam=cam,
                   pseudo_label_choice_rule=pseudo_label_choice_rule(args))  # fmt: skip
    if not has_masks(train):
        accelerator.print("The training split has no ground-truth masks: pseudo-labels and CAMs are not scored.")
        return
    if accelerator.is_main_process:
        scored = {"pseudo_labels": "pseudo_label_crf_miou" if crf else "pseudo_label_miou",
                  "pseudo_labels_nocrf": "pseudo_label_miou"}  # fmt: skip
        for name, folder in folders.items():
            scores = evaluate_pseudo_labels(train, folder, len(class_names) + 1)
            results[scored[name]] = scores["mean_iou"]
            results[scored[name].replace("_miou", "_per_class_iou")] = {
                label: _float(iou) for label, iou in zip(["background", *class_names], scores["per_category_iou"])
            }
            # The paper's pseudo-label mIoU is on VOC `train` (1,464 images), a subset of train_aug.
            if args.pseudo_label_eval_split:
                images = split(dataset, args.pseudo_label_eval_split)
                results[f"{scored[name]}_{args.pseudo_label_eval_split}"] = evaluate_pseudo_labels(
                    images, folder, len(class_names) + 1
                )["mean_iou"]
    subset = cam_selection_subset(args, dataset)
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
    from_timm = args.seg_init == "backbone" and reads_timm_config(args.seg_backbone, args.seg_backbone_arch)
    if from_timm:
        backbone = prepare_timm_backbone(args.seg_backbone, "segmentation", arch=args.seg_backbone_arch)
        fields = {k: v for k, v in backbone.config_fields.items() if k not in ("image_size", "layer_norm_eps")}
        model = WeakTrForSemanticSegmentation(model_config(
            args, segmentation_id2label(class_names), args.seg_image_size, backbone.config_fields["layer_norm_eps"],
            **fields))  # fmt: skip
        load_timm_backbone(model, backbone.model, position_interpolation=args.seg_backbone_interpolation)
    else:
        model = WeakTrForSemanticSegmentation(seg_model_config(args, segmentation_id2label(class_names)))
    if args.seg_init == "backbone" and not from_timm:
        report = load_timm_backbone(model, args.seg_backbone, position_interpolation=args.seg_backbone_interpolation)
        logger.info("Step-2 backbone %s: %d tensors loaded, unused %s", args.seg_backbone, len(report.loaded_keys),
                    report.unused_keys)  # fmt: skip
    if args.seg_init == "cam":
        cam_model = WeakTrForCAM.from_pretrained(os.path.join(args.output_dir, "cam"))
        layout = ("encoder_variant", "num_register_tokens", "use_absolute_position_embeddings", "hidden_size",
                  "num_hidden_layers", "patch_size")  # fmt: skip
        different = [k for k in layout if getattr(cam_model.config, k, None) != getattr(model.config, k, None)]
        if different:
            raise ValueError(
                f"--seg_init cam starts step 2 from the step-1 encoder, but that encoder differs from step 2's in "
                f"{different}: use --seg_init backbone with --seg_backbone (the same timm backbone), or scratch."
            )
        load_timm_backbone(model, encoder_state_from_cam(cam_model), strict=False)
    # The saved processor gives the eval stage's single-scale prediction (its base size, windows), so the pipeline,
    # weaktr-predict and the eval stage agree; the decoder ensemble of the eval stage is the model's own output.
    model.config.auxiliary_ensemble_weight = args.eval_aux_weight or 0.0
    processor = evaluation_processor(
        args.window_size, args.window_stride, base_size=args.eval_base_size, min_size=args.eval_min_size,
        patch_size=model.config.patch_size, image_mean=args.seg_image_mean, image_std=args.seg_image_std,
        size=args.seg_image_size,
    )  # fmt: skip
    transform = SegmentationTrainTransform(
        crop_size=args.seg_crop_size, base_size=args.seg_base_size, max_ratio=args.seg_max_ratio,
        antialias=args.seg_antialias, mean=args.seg_image_mean, std=args.seg_image_std,
    )  # fmt: skip
    loader = make_loader(train, transform, SegmentationCollator(), args.seg_per_device_train_batch_size,
                         args.seed, args.dataloader_num_workers)  # fmt: skip
    optimizer = build_seg_optimizer(model, args.seg_learning_rate, args.seg_encoder_lr_scale,
                                    momentum=args.seg_momentum, nesterov=args.seg_nesterov)  # fmt: skip
    model, prepared_optimizer, loader = accelerator.prepare(model, optimizer, loader)
    epochs = epochs_for(math.ceil(len(loader) / args.gradient_accumulation_steps), args.seg_num_train_epochs,
                        args.seg_target_train_updates, args.seg_max_train_epochs)  # fmt: skip
    max_steps, seg_steps_per_epoch = training_steps(loader, epochs, args.seg_max_train_steps,
                                                    args.gradient_accumulation_steps)  # fmt: skip
    # Not prepared: one step per update of the global batch on any number of processes.
    scheduler = build_scheduler("poly", optimizer, max_steps, min_learning_rate=args.seg_min_learning_rate)
    optimizer = prepared_optimizer
    start = time.time()
    train_model(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=max_steps,
        checkpoint_dir=os.path.join(args.output_dir, "checkpoints", "seg"),
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, log_prefix="seg", logging_steps=args.logging_steps,
    )  # fmt: skip
    seg_dir = os.path.join(args.output_dir, "seg")
    save_pretrained_atomic(accelerator.unwrap_model(model), seg_dir, processor, accelerator.is_main_process)
    if accelerator.is_main_process:  # what weaktr-predict uses unless a flag overrides it: the eval stage's settings
        save_predict_settings(seg_dir, scales=list(args.eval_scales), flip=True, window_size=args.window_size,
                              window_stride=args.window_stride, base_size=args.eval_base_size,
                              min_size=args.eval_min_size, aux_weight=args.eval_aux_weight, crf=args.eval_crf)  # fmt: skip
    release_training_state(accelerator)
    results.update(seg_train_seconds=round(time.time() - start, 1), seg_train_steps=max_steps,
                   seg_train_epochs=math.ceil(max_steps / seg_steps_per_epoch))  # fmt: skip


def eval_stage(args, accelerator, dataset, class_names, results):
    """The segmenter on the validation split (multi-scale + flip): one prediction PNG per image in predictions/,
    figures of a few; mIoU (single scale, multi-scale + flip, and with the dense CRF when `--eval_crf` is set) on
    the images that have a mask (none without)."""
    val = split(dataset, args.val_split)
    if args.eval_ids:
        val = select_ids(val, read_ids(args.eval_ids), "--eval_ids")
    model = WeakTrForSemanticSegmentation.from_pretrained(os.path.join(args.output_dir, "seg")).to(accelerator.device)
    figures = os.path.join(args.output_dir, "figures")
    predictions = os.path.join(args.output_dir, "predictions")
    os.makedirs(figures, exist_ok=True)

    def save_prediction(index, example, prediction):
        save_label_png(os.path.join(predictions, f"{example['id']}.png"), prediction.astype(np.uint8))
        if index < args.num_visualizations:
            panels, titles = [example["image"], colorize_mask(prediction)], ["image", "prediction"]
            if example.get("semantic_mask") is not None:
                panels.append(colorize_mask(example["semantic_mask"]))
                titles.append("ground truth")
            side_by_side(panels, titles=titles, min_side=FIGURE_MIN_SIDE, legend=["background", *class_names]).save(
                os.path.join(figures, f"prediction_{example['id']}.png")
            )

    common = dict(**segmentation_eval_options(args), accelerator=accelerator, max_samples=args.eval_samples,
                  skip_unlabelled=True)  # fmt: skip
    crf = EVAL_CRFS[args.eval_crf] if args.eval_crf else None
    passes = dict(scales=args.eval_scales, flip=True)
    if args.eval_without_masks == "predict" and not rows_with_masks(val):
        # Nothing to score: the predictions and figures at one pass (scale 1.0, no flip, no CRF) are what is useful.
        passes, crf = dict(scales=(1.0,), flip=False), None
        results["seg_val_prediction_passes"] = "scale 1.0, no flip, no CRF (no masks to score)"
    multi = evaluate_segmentation(model, val, on_prediction=save_prediction, crf=crf, **passes, **common)
    num_predicted = len(val) if args.eval_samples is None else min(args.eval_samples, len(val))
    results.update(seg_val_predictions=predictions, seg_val_predicted_samples=num_predicted,
                   seg_val_scored_samples=multi["num_scored"])  # fmt: skip
    if multi["num_scored"] == 0:
        note = (f"mIoU needs ground-truth masks and the {args.val_split!r} split has none: wrote {num_predicted} "
                f"predictions to {predictions} and figures to {figures}, not scored.")  # fmt: skip
        accelerator.print(note)
        results.update(seg_val_miou=None, seg_val_miou_ms_flip=None, seg_val_note=note)
    else:
        if multi["num_scored"] < num_predicted:
            accelerator.print(f"mIoU on the {multi['num_scored']} of {num_predicted} validation images that have a "
                              "mask; all of them have a prediction PNG.")  # fmt: skip
        single = evaluate_segmentation(model, val, scales=(1.0,), flip=False, show_progress=False, **common)
        final = multi["crf"] if crf is not None else multi
        results.update(
            seg_val_miou=single["mean_iou"], seg_val_miou_ms_flip=multi["mean_iou"],
            seg_val_pixel_accuracy=single["overall_accuracy"],
            seg_val_per_class_iou={name: _float(iou) for name, iou in zip(["background", *class_names],
                                                                             final["per_category_iou"])},
        )  # fmt: skip
        if crf is not None:
            results["seg_val_miou_ms_flip_crf"] = multi["crf"]["mean_iou"]
        if "final_only" in multi:  # the ensemble's final decoder output alone, from the same passes
            results["seg_val_miou_ms_flip_final_only"] = multi["final_only"]["mean_iou"]
    fit_report(args, accelerator, model, dataset, class_names, common, results)
    if args.dataset_path == "synthetic" and accelerator.is_main_process:
        results["trivial_baseline_miou"] = trivial_baseline_miou(split(dataset, args.val_split))
    if accelerator.is_main_process:
        save_cam_overlays(args, split(dataset, args.train_split), figures, class_names)


def segmentation_eval_options(args):
    """How the eval stage runs the segmenter, from a run's arguments: the sliding window, the base / minimum size,
    the auxiliary decoder's weight and the image transform (the run's normalisation, no resize or pad). Keyword
    arguments of `evaluate_segmentation` and `class_fit_report`, so that a diagnostic scores a saved segmenter the way
    its run did; the scales, flip, CRF and sample count are each caller's."""
    processor = WeakTrImageProcessor(do_resize=False, do_pad=False, image_mean=list(args.seg_image_mean),
                                     image_std=list(args.seg_image_std))  # fmt: skip

    def image_transform(image):
        return processor(image, return_tensors="pt").pixel_values[0]

    return dict(
        window_size=args.window_size, window_stride=args.window_stride, base_size=args.eval_base_size,
        min_size=args.eval_min_size, aux_weight=args.eval_aux_weight, image_transform=image_transform,
    )  # fmt: skip


def fit_report(args, accelerator, model, dataset, class_names, common, results):
    """How well the segmenter fits its own training pseudo-labels, per class (single scale, the first
    `--fit_report_samples` training images), and a warning for each class they hold that it never predicts: a class
    step 2 failed to learn (docs/step2-diagnosis.md). Skipped with 0 samples or without pseudo-labels."""
    from .diagnostics import class_fit_report

    folder = os.path.join(args.output_dir, "pseudo_labels")
    if not args.fit_report_samples or not os.path.isdir(folder):
        return
    train = pseudo_label_dataset(split(dataset, args.train_split), folder)
    options = {k: v for k, v in common.items() if k not in ("max_samples", "skip_unlabelled")}
    report = class_fit_report(model, train, None, class_names=["background", *class_names],
                              train_samples=args.fit_report_samples, log_warnings=False, **options)  # fmt: skip
    results.update(
        seg_train_fit_miou=report["fit_miou"], seg_train_fit_samples=report["fit_samples"],
        seg_train_fit_per_class_iou={row["name"]: _float(row["fit_iou"]) for row in report["classes"]},
        seg_never_predicted_classes=report["never_predicted"],
    )  # fmt: skip
    for warning in report["warnings"]:  # printed once here (not logged too), and once more under the results table
        accelerator.print(f"WARNING: {warning}")


def save_summary_figure(results, path):
    """mIoU of every stage of the run as bars, against the colour-threshold baseline (dashed) when it was scored."""
    values = {label.split(" (")[0]: 100 * results[key] for label, key in TABLE_ROWS[1:] if results.get(key) is not None}
    if not values:
        return  # nothing scored (no masks): no bars to draw
    baseline = results.get("trivial_baseline_miou")
    bar_chart(values, reference=None if baseline is None else 100 * baseline, reference_label="colour baseline",
              title="mIoU % per stage (CAMs and pseudo-labels: train; segmentation: val)").save(path)  # fmt: skip


def save_cam_overlays(args, train, figures, class_names):
    """Image | the three CAMs of the first present class | ground truth, for a few training images."""
    cam_dir = os.path.join(args.output_dir, "cam")
    if not os.path.isdir(cam_dir):
        return
    model = WeakTrForCAM.from_pretrained(cam_dir)
    processor = WeakTrImageProcessor(do_resize=False)
    for example in train.select(range(min(args.num_visualizations, len(train)))):
        if not example["labels"]:
            continue
        pixel_values = processor(example["image"], return_tensors="pt").pixel_values
        # The pixels the model sees (same conversion); CAMs are resized smoothly onto it
        image = upscale(PIL.Image.fromarray(pil_image_to_uint8(example["image"])), FIGURE_MIN_SIDE)
        first = example["labels"][0]
        panels, titles = [image], ["image"]
        for cam in CAM_NAMES:
            maps = generate_cams(model, pixel_values, [example["labels"]], scales=args.cam_scales,
                                 flip=args.cam_flip, cam=cam)  # fmt: skip
            panels.append(overlay_cam(image, maps[0, first].numpy()))
            titles.append(f"{cam.replace('_', ' ')}: {class_names[first]}")
        if example.get("semantic_mask") is not None:
            panels.append(colorize_mask(example["semantic_mask"]))
            titles.append("ground truth")
        side_by_side(panels, titles=titles, min_side=FIGURE_MIN_SIDE, legend=["background", *class_names]).save(
            os.path.join(figures, f"cam_{example['id']}.png"))


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
    ("pseudo-labels, no CRF (VOC train)", "pseudo_label_miou_train"),
    ("pseudo-labels, CRF (VOC train)", "pseudo_label_crf_miou_train"),
    ("segmentation, single scale (val)", "seg_val_miou"),
    ("segmentation, multi-scale + flip (val)", "seg_val_miou_ms_flip"),
    ("segmentation, multi-scale + flip, final decoder output only (val)", "seg_val_miou_ms_flip_final_only"),
    ("segmentation, multi-scale + flip + CRF (val)", "seg_val_miou_ms_flip_crf"),
)


def results_table(results):
    lines = ["| result | mIoU |", "|---|---|"]
    for label, key in TABLE_ROWS:
        if results.get(key) is not None:
            lines.append(f"| {label} | {100 * results[key]:.1f} |")
    return "\n".join(lines)




def results_summary(results):
    """The results table, or a sentence saying that nothing was scored (no masks), plus the mask-free choice."""
    lines = []
    if any(results.get(key) is not None for _, key in TABLE_ROWS):
        lines.append(results_table(results))
    elif results.get("seg_val_note") or results.get("pseudo_labels_written_per_process"):
        lines.append("Nothing was scored: the data has no ground-truth masks. Look at the predictions and figures.")
    else:
        lines.append("No mIoU yet: the pseudo and eval stages score the run.")
    if results.get("seg_never_predicted_classes"):
        lines.append(
            f"WARNING: the segmenter never predicts {', '.join(results['seg_never_predicted_classes'])} on "
            f"{results['seg_train_fit_samples']} training images although their pseudo-labels hold them: step 2 did "
            "not learn these classes (seg_train_fit_per_class_iou in all_results.json; docs/step2-diagnosis.md)."
        )
    if results.get("cam_choice_rule"):
        lines.append(
            f"Without masks the pseudo-labels come from {results['cam_choice']} at threshold "
            f"{results['cam_choice_threshold']:.2f}, chosen by the rule {results['cam_choice_rule']} (the CAM whose "
            "scale and flip passes agree most after Otsu's threshold), and the step-1 epoch by the lowest held-out "
            "classification loss. A rule can pick a CAM that lights up the background around the objects: check "
            "figures/cam_*.png before trusting the pseudo-labels."
        )
    return "\n".join(lines)


def check_crf(args, accelerator):
    """Without pydensecrf2 a recipe that uses the dense CRF runs without it: say so before anything trains, turn the
    CRF off in `args` (before the run records its recipe, so a resume compares like with like) and return the note
    for the results (None when nothing changes)."""
    from .crf import INSTALL_HINT, crf_available

    stages = requested_stages(args)
    uses = [what for what, used in (("the pseudo-labels", not args.no_crf and "pseudo" in stages),
                                    ("the evaluation", bool(args.eval_crf) and "eval" in stages)) if used]  # fmt: skip
    if not uses or crf_available():
        return None
    note = (f"pydensecrf2 is not installed, so {' and '.join(uses)} will be made without the dense CRF of the recipe "
            f"(results differ from a run with it). To use it: {INSTALL_HINT}.")  # fmt: skip
    accelerator.print(note)
    args.no_crf, args.eval_crf = True, None
    return note


def announce_run(args, accelerator):
    accelerator.print(f"Global batch {args.total_train_batch_size} (step 1), {args.seg_total_train_batch_size} "
                      f"(step 2) over {accelerator.num_processes} process(es)")  # fmt: skip
    if args.preset == "demo" and args.dataset_path == "synthetic":
        start = f"backbone {args.backbone}" if args.backbone else "no backbone (random init)"
        accelerator.print(f"weaktr demo: offline run on the built-in synthetic dataset with a small ViT, {start}; "
                          "a demonstration of the whole recipe, not the paper's setting (no ImageNet weights).")
    else:
        accelerator.print(f"weaktr: preset {args.preset} on {args.dataset_path}")
    kept = tuned_values_kept(args)
    if kept:
        accelerator.print(f"--preset {args.preset} on a dataset that is not its own keeps the values tuned on "
                          f"{args.preset.split('-')[0].upper()}: " + ", ".join(f"{k} {v}" for k, v in kept.items())
                          + f"; --preset own-{args.preset.split('-', 1)[1]} chooses them from your data.")  # fmt: skip


def tuned_values_kept(args):
    """The dataset-tuned values a VOC / COCO preset keeps when it runs on another dataset (empty on its own)."""
    family = args.preset.split("-")[0]
    if family not in ("voc12", "coco14") or args.dataset_path == "synthetic":
        return {}
    path = os.path.expanduser(str(args.dataset_path))
    own = os.path.isdir(path) and (find_voc_root(path) is not None if family == "voc12" else is_coco_root(path))
    if own:
        return {}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(args).items()
            if key in DATASET_TUNED}  # fmt: skip


def report(args, results, results_path, accelerator):
    """Print the results (or why there are none) and draw the summary figure of a run that evaluated."""
    if results.get("eval_stage_seconds") is not None:
        save_summary_figure(results, os.path.join(args.output_dir, "figures", "summary.png"))
    accelerator.print(results_summary(results))
    accelerator.print(f"Results: {results_path}")


STAGE_RUNNERS = {"cam": cam_stage, "pseudo": pseudo_stage, "seg": seg_stage, "eval": eval_stage}


# ---------------------------------------------------------------------------------------------------------------------
# Hub: the repositories are checked before training, both models pushed after it
# ---------------------------------------------------------------------------------------------------------------------


def hub_repo_ids(args):
    """(segmenter repository, CAM model repository): the CAM model goes to `<id>-cam`, a repository of its own, so
    each has its own card and pipeline tag and `from_pretrained(<id>)` needs no subfolder (weaktr_hf.hub)."""
    from .hub import cam_repo_id

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    return repo_id, cam_repo_id(repo_id)


def prepare_hub(args):
    """Check the token and create (or find) both repositories before anything trains; one line on failure."""
    from .hub import HubSetupError, prepare_hub_repos

    try:
        return prepare_hub_repos(hub_repo_ids(args), token=args.hub_token, private=args.hub_private_repo)
    except HubSetupError as error:
        raise ValueError(f"--push_to_hub: {error}") from None


def hub_base_model(args):
    """The Hub model a run started from, for the cards' `base_model`: a timm name's Hub copy, a Hub CAM model."""
    name = args.cam_model_name_or_path or args.backbone
    if not name or os.path.exists(str(name)):
        return None
    return name if args.cam_model_name_or_path else f"timm/{name}"


def push_run(args, repo_ids, results):
    """Push the run's segmenter and CAM model, each with its processor and card, to the checked repositories."""
    from .hub import push_run_to_hub

    push_run_to_hub(args.output_dir, repo_ids[0], results, results["command"], str(args.dataset_path),
                    license=args.license, base_model=hub_base_model(args), token=args.hub_token,
                    private=args.hub_private_repo)  # fmt: skip
