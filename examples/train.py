#!/usr/bin/env python
"""WeakTr's whole weakly-supervised segmentation recipe with Accelerate.

    accelerate launch examples/train.py            # offline demo on the built-in synthetic dataset (<10 min, CPU)
    accelerate launch examples/train.py --preset voc12-deit-s --dataset_path /data/VOCdevkit/VOC2012 \
        --backbone deit_small_patch16_224 --output_dir runs/voc12

Stages (`--stage`, default `all`), each reading what the previous one wrote in `--output_dir`:
  cam     step 1: train WeakTrForCAM from image-level labels; keep the epoch with the best CAM mIoU on a train subset
          (without masks: the lowest held-out classification loss, then the CAM and threshold by Otsu's rule)
  pseudo  multi-scale + flip CAMs -> background threshold -> dense CRF -> one pseudo-label PNG per training image
  seg     step 2: train WeakTrForSemanticSegmentation on the pseudo-labels with the gradient-clipping loss
  eval    predict the validation split (PNGs in predictions/, figures), score it where it has masks, write the table

Your own images (a folder with metadata.csv, class-named subfolders, a saved or Hub dataset; no masks needed):
    accelerate launch examples/train.py --dataset_path my_photos --class_names cat dog --output_dir runs/mine
"""

import argparse
import json
import logging
import math
import os
import sys
import time

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from weaktr_hf import (
    WeakTrConfig,
    WeakTrForCAM,
    WeakTrForSemanticSegmentation,
    WeakTrImageProcessor,
    load_timm_backbone,
)
from weaktr_hf.configuration_weaktr import ENCODER_VARIANTS
from weaktr_hf.crf import COCO_PSEUDO_LABEL_CRF, COCO_SEGMENTATION_CRF, SEGMENTATION_CRF, VOC_PSEUDO_LABEL_CRF
from weaktr_hf.data import (
    SYNTHETIC_CONFIGURATIONS,
    CAMCollator,
    CAMTrainTransform,
    SegmentationCollator,
    SegmentationTrainTransform,
    get_class_names,
    load_wsss_dataset,
    trivial_baseline_miou,
)
from weaktr_hf.data.coco import is_coco_root
from weaktr_hf.data.voc import find_voc_root
from weaktr_hf.evaluation import evaluate_cams, evaluate_segmentation
from weaktr_hf.hub import push_folder_to_hub, render_model_card
from weaktr_hf.image_processing_weaktr import pil_image_to_uint8
from weaktr_hf.inference import generate_cams
from weaktr_hf.labels import foreground_id2label, segmentation_id2label
from weaktr_hf.pseudo_labels import evaluate_pseudo_labels, pseudo_label_dataset, write_pseudo_labels
from weaktr_hf.selection import CLASSIFICATION_RULE, choose_cam_without_masks, heldout_classification_loss
from weaktr_hf.training import (
    SeededTransformDataset,
    TrainState,
    UpdateStepCosineScheduler,
    build_cam_optimizer,
    build_scheduler,
    build_seg_optimizer,
    release_training_state,
    save_pretrained_atomic,
    train_model,
    write_json_atomic,
)
from weaktr_hf.visualization import (
    FIGURE_MIN_SIDE, bar_chart, colorize_mask, overlay_cam, save_label_png, side_by_side, upscale,
)  # fmt: skip

logger = logging.getLogger("weaktr")

STAGES = ("cam", "pseudo", "seg", "eval")
CAM_NAMES = ("coarse_cam", "fine_cam", "cross_attention")

# Every hyper-parameter of a recipe. Flags given on the command line override the preset's value; keys a preset does
# not set take FALLBACKS. Batch sizes are global (`total_train_batch_size`, `seg_total_train_batch_size`): each process
# gets global / (processes x accumulation steps), and schedules count updates of the global batch.
# The demo's backbone: the demo-sized ViT pre-trained on formula-driven fractals (no natural image, no download) by
# examples/pretrain_backbone.py; its card is examples/demo_backbone/README.md.
DEMO_BACKBONE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_backbone", "model.safetensors")
PRESETS = {
    # Offline demo: the built-in synthetic dataset and a small ViT, pre-trained on fractals, on 2 CPU cores in minutes.
    # No ImageNet weights can be had offline, so this is a demonstration of the whole pipeline, not a reproduction.
    "demo": dict(
        dataset_path="synthetic", synthetic_num_classes=4, synthetic_image_size=64, synthetic_num_train=1000,
        synthetic_num_val=100,
        # A 4-layer ViT of width 128 on 8-px patches (an 8 x 8 grid): small enough for ~1,000 steps in a few minutes.
        patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        drop_path_rate=0.0, aaf_reduction=2, aaf_feat_reduction=2, backbone=DEMO_BACKBONE,
        # The fine score is about the coarse score / 64 patches here: x64 gives the fine loss (and the fusion weights
        # it trains) a signal; the demo's option, off (1.0) in the model and the paper presets (README).
        fine_cam_scale=64.0,
        cam_image_size=64, cam_augment="light", total_train_batch_size=32, learning_rate=2e-3,
        weight_decay=0.03, num_train_epochs=30, warmup_epochs=2, cam_eval_samples=64,
        # In this small model the fine CAM stays behind the others (README, "The fine CAM, measured"): pick the best
        # of the three CAMs and the threshold on the train subset, and report all three.
        cam_threshold="sweep", cam_sweep_thresholds=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        cam_scales=(1.0, 1.25), cam_flip=True, pseudo_label_cam="auto", crf="voc12",
        seg_image_size=64, seg_crop_size=64, seg_base_size=64, seg_total_train_batch_size=16,
        seg_learning_rate=0.01, seg_encoder_lr_scale=0.1, seg_num_train_epochs=10, seg_init="cam",
        decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=512, decoder_hidden_dropout_prob=0.0,
        # 32-px windows: 4 per 64-px crop, as 120-px windows are 4 per side of the paper's 480 crops. Clipping starts
        # from a mean loss of 0.3: once on, it takes the gradient of every pixel of a class not yet learned (all of
        # them are above the cap), while the class is still pushed down everywhere else, so it is never learned. From
        # 0.63 (the paper's 1.2 x ln 5 / ln 21) it was on in half the updates by epoch 7 and eight-classes seed 42
        # lost 3 classes its pseudo-labels hold; from 0.3, none (36.1 -> 47.2 mIoU). One seed; the decoder's collapsed
        # class embeddings can drop classes without clipping too (docs/step2-diagnosis.md).
        clip_start_value=0.3, clip_window_size=32,
        # Evaluation geometry scaled from the authors' (base 520, passes below 480 upsampled, ratios 0.5-1.75): base
        # 64 (the native size, the step-2 base), passes below round(64 x 480 / 520) = 59 upsampled, the same ratios.
        window_size=64, window_stride=48, eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), eval_min_size=59,
        eval_samples=None,
        # One intra-op thread per process: this model's ops are too small to split, and two threads sharing 2 cores
        # with any other process were measured 17x slower per step (3.5 s vs 0.21 s).
        num_threads=1,
        # One loader process prepares batches on the other core; augmentation is seeded per sample, so the results
        # are identical to loading in the main process (checked bit for bit), only faster.
        dataloader_num_workers=1,
    ),  # fmt: skip
}

# The authors' recipe, from their code (hustvl/WeakTr at 3457ad3; `OR/` = OnlineRetraining/segm/). Each value cites
# the file:line it comes from; where a documented command (docs/Training.md, docs/Evaluate.md) overrides a default,
# the documented value is used. Presets for other backbones and datasets derive from these pieces.
DEIT_S = dict(
    # deit_small_patch16_224 (main.py:50, models.py WeakTr defaults; OR/config.yml deit_small_patch16_224).
    patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
    drop_path_rate=0.1,  # main.py:56; OR/train.py:56
    # Step-2 decoder: d_model = encoder width, heads = width // 64, FF = 4 x width (OR/model/factory.py:120-124),
    # 2 layers and dropout 0.1 (OR/config.yml:153-156).
    decoder_hidden_size=384, decoder_num_hidden_layers=2, decoder_num_attention_heads=6,
    decoder_intermediate_size=1536, decoder_hidden_dropout_prob=0.1,
)  # fmt: skip
AUTHORS_THRESHOLD_SWEEP = tuple(round(0.40 + 0.01 * i, 2) for i in range(20))  # 0.40 ... 0.59 (main.py:177-178)
AUTHORS_STEP1 = dict(
    aaf_reduction=8,  # --reduction 8 (docs/Training.md:14); AAF max pooling (Training.md:15) is the config default
    aaf_feat_reduction=8,  # main.py:62
    cam_head_init="pytorch",  # conv head and AAF keep PyTorch's default init (models.py:24-26, 41; AAF.py:12-22)
    layer_norm_eps=1e-6,  # norm_layer=partial(nn.LayerNorm, eps=1e-6) (models.py:151)
    cam_drop_last=True,  # drop_last=True (main.py:251)
    cam_image_size=224,  # main.py:52
    cam_augment="timm",  # timm create_transform, rand-m9-mstd0.5-inc1, re 0.25 (datasets.py:198-207; main.py:106-124)
    total_train_batch_size=64,  # global batch, divided over processes (main.py:33, 210)
    learning_rate=6e-4 * 64 / 512,  # --lr 6e-4 (Training.md:16) x batch x world / 512 (main.py:357-358)
    weight_decay=0.03,  # Training.md:17
    decay_all_parameters=True,  # create_optimizer(args, model.parameters()): no bias/norm filter (main.py:360)
    num_train_epochs=60,  # main.py:34
    # timm CosineLRScheduler stepped after each epoch (main.py:363, 399): t_initial 60, warm-up 5 epochs from 1e-6,
    # lr_min 1e-5 (main.py:89-96).
    cam_lr_schedule="epoch", warmup_epochs=5, warmup_learning_rate=1e-6, min_learning_rate=1e-5,
    # Best-epoch selection: after each epoch, fine CAMs at scale 1.0 plus flip (--scales default [1.0], the MS
    # dataset appends the flip: main.py:170, datasets.py:157-161) on the selection list (Training.md:11, 55), each
    # threshold from 0.40 up in 0.01 steps while the mIoU improves (main.py:177-178; evaluation.py:258-267).
    cam_eval_samples=None, cam_eval_scales=(1.0,), cam_eval_flip=True,
    cam_selection_thresholds=AUTHORS_THRESHOLD_SWEEP, cam_selection_early_stop=True,
    # Pseudo-labels: fine CAM (attention-type fused + patch refine, main.py:162, 172), flip (datasets.py:157-160).
    # The sweep list is used only if --cam_threshold sweep replaces the authors' fixed threshold.
    pseudo_label_cam="fine_cam", cam_flip=True, cam_sweep_thresholds=AUTHORS_THRESHOLD_SWEEP,
)  # fmt: skip
AUTHORS_STEP2 = dict(
    seg_layer_norm_eps=1e-5,  # nn.LayerNorm defaults in the step-2 ViT (OR/model/blocks.py:84; OR/model/vit.py:89)
    seg_init="backbone",  # ImageNet weights, pos 14 -> 30 bilinear (OR/model/factory.py:95-96; OR/model/utils.py:22-40)
    seg_image_size=480, seg_crop_size=480,  # crop 480 (OR/config.yml:182)
    seg_base_size=520,  # im_size 520 (OR/config.yml:181): short side 520 x ratio in [0.5, 2] (OR/data/base.py:58-66)
    seg_max_ratio=8,  # long side <= 8 x 520 x ratio (max_ratio, OR/data/config/pascal_voc.py:10)
    seg_antialias=False,  # mmcv cv2 bilinear resize, no antialiasing
    # mmseg Normalize with the DeiT mean/std x 255 rounded to 2 decimals (OR/data/base.py:35-37; OR/data/utils.py:10).
    seg_image_mean=tuple(value / 255 for value in (123.68, 116.28, 103.53)),
    seg_image_std=tuple(value / 255 for value in (58.4, 57.12, 57.38)),
    seg_total_train_batch_size=4,  # --batch-size 4, global, divided over processes (OR/train.py:57, 147-148, 160)
    seg_learning_rate=1e-4,  # OR/train.py:59
    seg_encoder_lr_scale=0.1,  # --enc-lr 0.1 as lr_scale of every encoder group (OR/train.py:61, 252-268)
    seg_min_learning_rate=1e-5,  # poly power 0.9 down to min_lr 1e-5, per iteration (OR/train.py:63-64, 192-196)
    # --optimizer sgd is Nesterov SGD, momentum 0.9 (OR/train.py:52, 188; OR/optim/optim_factory.py:134-136).
    seg_nesterov=True, seg_momentum=0.9,
    seg_num_train_epochs=100,  # --epochs 100 (OR/train.py:58)
    clip_start_value=1.2, clip_window_size=120,  # --start-value 1.2 --patch-size 120 (Training.md:96, 107)
    # Evaluation (docs/Evaluate.md): windows 480 / 320 (OR/config.yml:183-184); each image resized to short side 520
    # x scale (OR/data/base.py:58-61, 92-111; OR/eval/miou.py:257-258), passes below 480 upsampled to 480
    # (OR/model/utils.py:106-118, 181); 0.8 x P(decoder block 1) + P(final) (--backbone multi --weight 0.8,
    # OR/eval/miou.py:84-85, 222-223; OR/model/decoder.py:175-191); then the dense CRF (OR/eval/make_crf.py:141-163).
    window_size=480, window_stride=320, eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), eval_samples=None,
    eval_base_size=520, eval_min_size=480, eval_aux_weight=0.8,
)  # fmt: skip
PRESETS["voc12-deit-s"] = dict(
    **DEIT_S, **AUTHORS_STEP1, **AUTHORS_STEP2,
    train_split="train_aug",  # datasets.py:105; Training.md:23
    cam_eval_split="train",  # voc12/train_id.txt, the 1,464 VOC train images (Training.md:11)
    pseudo_label_eval_split="train",  # pseudo-label mIoU also on VOC train, as reported (Training.md:32)
    cam_threshold=0.43,  # --t 43 (Training.md:45)
    cam_scales=(1.0, 1.2),  # Training.md:24
    crf="voc12",  # crf_inference_label (tool/imutils.py:4-20)
    eval_crf="voc12",  # crf_inference_voc12 (OR/eval/densecrf.py:4-37)
)  # fmt: skip
PRESETS["coco14-deit-s"] = dict(
    PRESETS["voc12-deit-s"],
    learning_rate=2e-4 * 64 / 512,  # --lr 2e-4 (Training.md:61) x batch x world / 512 (main.py:357)
    train_split="train",  # coco/train_id.txt, 82,081 images (datasets.py:37; Training.md:67)
    coco_id_layout="raw",  # 90 class tokens on raw category ids (datasets.py:184-189)
    # coco/train_1250_id.txt: the first 1,250 train ids in annotation-file order (Training.md:55).
    cam_eval_split=None, cam_eval_samples=1250, cam_eval_order="annotation_file", pseudo_label_eval_split=None,
    cam_threshold=0.42,  # --t 42 (Training.md:82)
    cam_scales=(1.0, 0.8, 1.2),  # Training.md:68
    crf="coco14",  # crf_inference_label_coco (tool/imutils.py:22-38)
    eval_crf="coco14",  # crf_inference_coco (OR/eval/densecrf.py:40-70)
)  # fmt: skip

# Step 2 on the authors' other backbones (their README's step-2 table): step 1 stays DeiT-S, as theirs; the step-2
# recipe is the DeiT-S one, since nothing in OR/train.py depends on the backbone but the model and its statistics.
# Backbones are OR/config.yml's, named by timm's name of the same weights (weaktr_hf.timm_backbone.PRETRAINED_BACKBONES
# says how each was loaded). Statistics: OR/data/utils.py:8-12 STATS x 255 rounded to 2 decimals (OR/data/base.py:
# 35-37).
STEP2_BACKBONES = {
    # vit_small_patch16_384 (OR/config.yml:63-69, normalization vit): the ImageNet-21k augreg weights, loaded by timm
    # 0.5.4's npz loader (load_custom_pretrained, OR/model/factory.py:103-104), which resizes the table bicubically.
    "vit-s": dict(
        seg_encoder="vit", seg_backbone="vit_small_patch16_384.augreg_in21k_ft_in1k",
        seg_backbone_interpolation="bicubic", seg_image_mean=(0.5, 0.5, 0.5), seg_image_std=(0.5, 0.5, 0.5),
    ),
    # dinov2_small_patch16_224 (OR/config.yml:115-122, normalization deit as DeiT-S): DINOv2 ViT-S/14 LVD-142M
    # (OR/model/factory.py:26, 98-100) in DINOV2VisionTransformer, a ViT with LayerScale (OR/model/vit.py).
    "dinov2-s": dict(
        seg_encoder="dinov2", seg_backbone="vit_small_patch14_dinov2.lvd142m", seg_backbone_interpolation="bilinear",
    ),
    # eva02_small_patch16_224 (OR/config.yml:140-147, normalization eva02): EVA-02-S MIM ImageNet-21k
    # (OR/model/factory.py:27, 101-105); d_ff = int(4 * 2 / 3 * 384) = 1024 (OR/model/factory.py:78-80).
    "eva02-s": dict(
        seg_encoder="eva02", seg_intermediate_size=1024, seg_backbone="eva02_small_patch14_224.mim_in22k",
        seg_backbone_interpolation="bilinear",
        seg_image_mean=tuple(value / 255 for value in (122.77, 116.75, 104.09)),
        seg_image_std=tuple(value / 255 for value in (68.5, 66.63, 70.32)),
    ),
}  # fmt: skip
for _dataset in ("voc12", "coco14"):
    for _backbone, _step2 in STEP2_BACKBONES.items():
        PRESETS[f"{_dataset}-{_backbone}"] = dict(PRESETS[f"{_dataset}-deit-s"], **_step2)
CRF_PRESETS = {"voc12": VOC_PSEUDO_LABEL_CRF, "coco14": COCO_PSEUDO_LABEL_CRF}
EVAL_CRF_PRESETS = {"voc12": SEGMENTATION_CRF, "coco14": COCO_SEGMENTATION_CRF}
FALLBACKS = dict(
    dataset_path="synthetic", train_split="train", val_split="val", seed=42, gradient_accumulation_steps=1,
    dataloader_num_workers=0, checkpoints_total_limit=2, logging_steps=10, max_train_steps=None,
    seg_max_train_steps=None, num_visualizations=4, crf="voc12", use_gradient_clipping=True, backbone=None,
    seg_backbone=None, seg_encoder="vit", seg_intermediate_size=None, seg_backbone_interpolation=None,
    cam_model_name_or_path=None, num_threads=None,
    # Package defaults where the authors' recipe is not the point (the demo): a per-update cosine from 0 to 0 and a
    # poly decay to 0, decay-free biases and tokens, scales applied to the native image, no eval CRF or ensemble.
    cam_lr_schedule="step", warmup_learning_rate=0.0, min_learning_rate=0.0, decay_all_parameters=False,
    cam_head_init="default", layer_norm_eps=None, seg_layer_norm_eps=None, cam_drop_last=False, cam_eval_split=None,
    cam_eval_order="dataset", cam_eval_ids=None,
    cam_eval_scales=None, cam_eval_flip=False, cam_selection_thresholds=None, cam_selection_early_stop=False,
    seg_min_learning_rate=0.0, seg_nesterov=False, seg_momentum=0.9, seg_max_ratio=4, seg_antialias=True,
    seg_image_mean=tuple(IMAGENET_DEFAULT_MEAN), seg_image_std=tuple(IMAGENET_DEFAULT_STD),
    eval_base_size=None, eval_min_size=None, eval_aux_weight=0.0, eval_crf=None, eval_ids=None,
    coco_id_layout="contiguous", voc_labels_from="auto", image_labels_file=None, pseudo_label_eval_split=None,
    validation_split_percentage=10.0, on_bad_sample="raise",
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", default="demo", choices=sorted(PRESETS), help="recipe whose hyper-parameters are the defaults")
    add("--stage", default="all", choices=("all",) + STAGES)
    add("--output_dir", default="outputs/weaktr-demo")
    add("--dataset_path", help="'synthetic', a VOCdevkit/VOC2012 or COCO root, a saved dataset or a Hub id")
    add("--train_split")
    add("--val_split", help="validation split (default 'val', or 'validation' where that is the dataset's name)")
    # Your own data (README, "Train on your own images"): column names and classes, as transformers' examples name them.
    add("--image_column_name", help="image column of a folder / saved / Hub dataset (default 'image')")
    add("--labels_column_name", help="image-level labels: class names ('cat;dog', a JSON list) or ids (default "
        "'labels', else ImageFolder's 'label')")
    add("--mask_column_name", help="optional ground-truth mask column (default 'semantic_mask' if present)")
    add("--class_names", nargs="+", help="foreground class names in label order, or one text file with a name per "
        "line (default: the dataset's ClassLabel names, else the names its label column uses, sorted)")
    add("--validation_split_percentage", type=float, help="without a validation split, hold out this percentage "
        "of the training images as one (default 10)")
    add("--on_bad_sample", choices=("raise", "skip"), help="unreadable image / unknown label: stop with an error "
        "naming the file (default), or skip it with a log line")
    add("--backbone", help="ImageNet init: a timm model name (needs network) or a local timm checkpoint file; "
        "'none' to start from random weights")
    add("--seg_backbone",
        help="step-2 encoder init (default --backbone): a timm name, e.g. the authors' vit_small_patch14_dinov2.lvd142m"
        " or eva02_small_patch14_224.mim_in22k (needs network), or a local file of those weights (timm or official)")
    add("--seg_encoder", choices=sorted(ENCODER_VARIANTS),
        help="step-2 block layout: vit (DeiT-S, ViT-S), dinov2 (LayerScale) or eva02 (SwiGLU, q/v bias, 2-D RoPE)")
    add("--seg_intermediate_size", type=int, help="step-2 encoder MLP width (default --intermediate_size)")
    add("--seg_backbone_interpolation", choices=("bilinear", "bicubic"),
        help="resize of the --seg_backbone position table to the crop's grid (default: as the authors for the name)")
    add("--cam_model_name_or_path", help="start step 1 from a saved / converted WeakTrForCAM instead")
    add("--allow_random_init", action="store_true",
        help="let a paper preset train without --backbone / --cam_model_name_or_path (from random weights)")
    add("--print_config", action="store_true", help="print the resolved recipe as JSON and exit (loads nothing)")
    add("--seed", type=int)
    # Step 1 (the standard names configure the CAM stage).
    add("--total_train_batch_size", type=int,
        help="global step-1 batch: each process gets it / (processes x accumulation steps)")
    add("--per_device_train_batch_size", type=int, help="overrides --total_train_batch_size")
    add("--learning_rate", type=float, help="peak step-1 lr (the authors' recipe: lr x global batch / 512)")
    add("--weight_decay", type=float)
    add("--decay_all_parameters", type=_bool, help="also decay biases, norms and tokens (as the authors)")
    add("--num_train_epochs", type=int)
    add("--max_train_steps", type=int, help="overrides --num_train_epochs")
    add("--warmup_epochs", type=float)
    add("--warmup_learning_rate", type=float, help="step-1 lr at the start of the warm-up")
    add("--min_learning_rate", type=float, help="step-1 cosine floor")
    add("--cam_lr_schedule", choices=("epoch", "step"),
        help="timm cosine stepped after each epoch (the authors') or after each update")
    add("--layer_norm_eps", type=float, help="step-1 encoder LayerNorm eps (default 1e-6 with --backbone, else 1e-5)")
    add("--seg_layer_norm_eps", type=float, help="step-2 encoder LayerNorm eps (default as step 1)")
    add("--cam_drop_last", type=_bool, help="drop the last incomplete step-1 batch of each epoch (the authors')")
    add("--cam_head_init", choices=("pytorch", "default"),
        help="init of the CAM conv head and the attention fusion: PyTorch's defaults (the authors') or trunc-normal")
    add("--gradient_accumulation_steps", type=int)
    add("--cam_image_size", type=int)
    add("--cam_augment", choices=("timm", "light", "none"))
    add("--cam_eval_samples", type=int, help="images scored after each epoch to pick the best one (first N)")
    add("--cam_eval_split", help="split holding the selection images (default: the training split)")
    add("--cam_eval_order", choices=("dataset", "annotation_file"),
        help="order before taking the first N: the dataset's, or the COCO annotation file's (the authors' lists)")
    add("--cam_eval_ids", help="text file of image ids (one per line) to select on instead")
    add("--cam_eval_scales", type=float, nargs="+", help="scales of the selection CAMs (default 1.0)")
    add("--cam_eval_flip", type=_bool, help="add flipped passes to the selection CAMs")
    add("--cam_selection_thresholds", type=float, nargs="+",
        help="thresholds scored at each selection (default: --cam_threshold, or the sweep list)")
    add("--cam_selection_early_stop", type=_bool,
        help="stop the threshold sweep at the first one that does not improve (the authors')")
    add("--cam_threshold", help="background score, or 'sweep' to pick it on the train subset (by mIoU with masks, "
        "by Otsu's rule on the CAMs without)")
    add("--cam_sweep_thresholds", type=float, nargs="+")
    add("--cam_scales", type=float, nargs="+")
    add("--no_cam_flip", dest="cam_flip", action="store_false", default=None)
    add("--pseudo_label_cam", choices=CAM_NAMES + ("auto",),
        help="CAM behind the pseudo-labels; 'auto' picks the best of the three on the train subset each epoch")
    add("--crf", choices=sorted(CRF_PRESETS), help="dense-CRF parameters for the pseudo-labels")
    add("--no_crf", action="store_true", help="skip the dense CRF (pseudo-labels straight from the CAMs)")
    add("--pseudo_label_eval_split", help="also score the pseudo-labels on the images of this split (VOC: train)")
    add("--coco_id_layout", choices=("raw", "contiguous"),
        help="COCO classes: 90 raw category ids (the authors') or 80 contiguous ones")
    add("--voc_labels_from", choices=("auto", "mask", "xml"),
        help="VOC image-level labels: the mask's classes where a mask exists (auto), the masks, or the XML objects")
    add("--image_labels_file", help="image-level labels from a .npy dict {id: multi-hot} (the authors' cls_labels.npy)")
    # Model size (presets set them; override for experiments).
    for name in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "aaf_reduction", "aaf_feat_reduction", "decoder_hidden_size", "decoder_num_hidden_layers",
                 "decoder_num_attention_heads", "decoder_intermediate_size", "clip_window_size"):  # fmt: skip
        add(f"--{name}", type=int)
    for name in ("drop_path_rate", "decoder_hidden_dropout_prob", "clip_start_value", "fine_cam_scale"):
        add(f"--{name}", type=float)
    # Step 2.
    add("--seg_total_train_batch_size", type=int, help="global step-2 batch, divided over processes")
    add("--seg_per_device_train_batch_size", type=int, help="overrides --seg_total_train_batch_size")
    add("--seg_learning_rate", type=float)
    add("--seg_min_learning_rate", type=float, help="floor of the poly schedule (the encoder ends at its scale x it)")
    add("--seg_encoder_lr_scale", type=float)
    add("--seg_momentum", type=float)
    add("--seg_nesterov", type=_bool)
    add("--seg_num_train_epochs", type=int)
    add("--seg_max_train_steps", type=int)
    add("--seg_image_size", type=int)
    add("--seg_crop_size", type=int)
    add("--seg_base_size", type=int)
    add("--seg_max_ratio", type=float, help="long side capped at this x the base size x the random ratio")
    add("--seg_antialias", type=_bool, help="antialiased resizing in step-2 augmentation (mmseg/cv2: no)")
    add("--seg_image_mean", type=float, nargs=3)
    add("--seg_image_std", type=float, nargs=3)
    add("--seg_init", choices=("backbone", "cam", "scratch"), help="encoder init: --backbone, the step-1 encoder, none")
    add("--no_gradient_clipping", dest="use_gradient_clipping", action="store_false", default=None)
    # Evaluation.
    add("--window_size", type=int)
    add("--window_stride", type=int)
    add("--eval_scales", type=float, nargs="+")
    add("--eval_samples", type=int, help="score only the first N validation images")
    add("--eval_ids", help="text file of validation image ids (one per line) to score instead of the whole split")
    add("--eval_base_size", type=int, help="resize each image to this short side before the scales")
    add("--eval_min_size", type=int, help="upsample any pass whose short side is below this")
    add("--eval_aux_weight", type=float, help="add this x the probabilities decoded before the last decoder block")
    add("--eval_crf", choices=sorted(EVAL_CRF_PRESETS), help="also score with the dense CRF on the probabilities")
    add("--num_visualizations", type=int)
    # Synthetic data.
    add("--synthetic_num_classes", type=int)
    add("--synthetic_image_size", type=int)
    add("--synthetic_num_train", type=int)
    add("--synthetic_num_val", type=int)
    add("--synthetic_config", default="default", choices=sorted(SYNTHETIC_CONFIGURATIONS),
        help="variant of the synthetic set (weaktr_hf.data.SYNTHETIC_CONFIGURATIONS); its num_classes, if any, wins")
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


def _bool(value):
    lowered = str(value).lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return lowered in ("true", "1", "yes")


def apply_preset(args, parser):
    """Unset flags take the preset's value, then the fallback; anything given on the command line wins."""
    preset = PRESETS[args.preset]
    for key, value in {**FALLBACKS, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("cam_flip",):
        if getattr(args, key) is None:
            setattr(args, key, True)
    if str(args.backbone).lower() == "none":  # e.g. the demo from scratch, without its pre-trained backbone
        args.backbone = None
    if args.preset != "demo" and args.dataset_path == "synthetic" and "dataset_path" not in preset:
        if not args.print_config:
            parser.error(f"--preset {args.preset} needs --dataset_path (a VOCdevkit/VOC2012 or COCO root, or a Hub "
                         "id).")  # fmt: skip
    if args.cam_threshold != "sweep":
        try:
            args.cam_threshold = float(args.cam_threshold)
        except ValueError:
            parser.error(f"--cam_threshold must be a number or 'sweep', got {args.cam_threshold!r}.")
    if args.checkpointing_steps not in (None, "epoch"):
        if not str(args.checkpointing_steps).isdigit():
            parser.error(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}.")
        args.checkpointing_steps = int(args.checkpointing_steps)
    args.seg_backbone = args.seg_backbone or args.backbone
    if args.seg_init == "cam" and args.seg_encoder != "vit":
        parser.error(f"--seg_init cam starts step 2 from the step-1 encoder, a plain ViT; --seg_encoder "
                     f"{args.seg_encoder} needs --seg_init backbone (its pretrained weights) or scratch.")  # fmt: skip
    if args.use_gradient_clipping and args.seg_crop_size < args.clip_window_size:
        parser.error(f"--seg_crop_size {args.seg_crop_size} is smaller than --clip_window_size "
                     f"{args.clip_window_size}: the only clipping window would be the whole crop, i.e. plain "
                     "global-mean clipping. Use a window at most the crop size, or --no_gradient_clipping.")  # fmt: skip
    check_pretrained_init(args, parser)
    return args


def check_pretrained_init(args, parser):
    """A paper preset trained from random weights is no reproduction: stop unless `--allow_random_init` says so."""
    stages = STAGES if args.stage == "all" else (args.stage,)
    missing = []
    if "cam" in stages and not (args.backbone or args.cam_model_name_or_path):
        missing.append("step 1 needs --backbone (ImageNet weights) or --cam_model_name_or_path")
    if "seg" in stages and args.seg_init == "backbone" and not args.seg_backbone:
        missing.append("step 2 (--seg_init backbone) needs --seg_backbone or --backbone")
    if missing and args.preset != "demo" and not args.allow_random_init and not args.print_config:
        parser.error(f"--preset {args.preset}: " + "; ".join(missing) + ". Without them training would start from "
                     "random weights; pass --allow_random_init to do that anyway.")  # fmt: skip
    if args.seg_init == "backbone" and not args.seg_backbone and not args.print_config:
        args.seg_init = "scratch"


def resolve_batch_sizes(args, num_processes):
    """Per-device batch sizes from the global ones (or the global ones from a per-device override)."""
    shards = num_processes * args.gradient_accumulation_steps
    for prefix in ("", "seg_"):
        per_device, total = f"{prefix}per_device_train_batch_size", f"{prefix}total_train_batch_size"
        if getattr(args, per_device) is None:
            if getattr(args, total) % shards:
                raise ValueError(
                    f"--{total} {getattr(args, total)} is not divisible by {num_processes} processes x "
                    f"{args.gradient_accumulation_steps} accumulation steps; choose a global batch that is, or set "
                    f"--{per_device}."
                )
            setattr(args, per_device, getattr(args, total) // shards)
        setattr(args, total, getattr(args, per_device) * shards)
    return args


def lr_schedule_table(args):
    """The lr of both steps at a few points, for the global batch on one process (`--print_config`)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    steps_per_epoch = 1  # in "epoch" mode the lr is constant within an epoch
    if args.cam_lr_schedule == "step":
        if args.dataset_path != "synthetic":
            steps_per_epoch = None  # depends on the dataset size
        else:
            steps_per_epoch = math.ceil(args.synthetic_num_train / args.total_train_batch_size)
    table = {"step1_lr_at_epoch_start": None}
    if steps_per_epoch is not None:
        optimizer = torch.optim.AdamW([parameter], lr=args.learning_rate)
        total = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        scheduler = cam_scheduler(args, optimizer, total, steps_per_epoch)
        epochs = sorted({epoch for epoch in (0, 1, 5, 6, 30, 59) if epoch < args.num_train_epochs})
        lrs, update = {}, 0
        for epoch in range(max(epochs) + 1):
            if epoch in epochs:
                lrs[str(epoch)] = scheduler.get_last_lr()[0]
            for _ in range(steps_per_epoch):
                scheduler.step()
                update += 1
        table["step1_lr_at_epoch_start"] = lrs
    steps = 1000
    optimizer = torch.optim.SGD(
        [{"params": [parameter], "lr": args.seg_learning_rate * args.seg_encoder_lr_scale},
         {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": args.seg_learning_rate}],
        lr=args.seg_learning_rate, momentum=args.seg_momentum,
    )  # fmt: skip
    scheduler = build_scheduler("poly", optimizer, steps, min_learning_rate=args.seg_min_learning_rate)
    seg = {}
    for step in range(steps + 1):
        if step in (0, steps // 2, steps):
            encoder, decoder = scheduler.get_last_lr()
            seg[f"{100 * step // steps}%"] = {"decoder": decoder, "encoder": encoder}
        optimizer.step()
        scheduler.step()
    table["step2_lr"] = seg
    return table


def resolved_config(args):
    """The resolved recipe: every flag's value plus `lr_schedule`, for the global batch on one process."""
    config = {key: value for key, value in vars(args).items() if key not in ("hub_token", "print_config")}
    config = json.loads(json.dumps(config, default=list))
    config["lr_schedule"] = lr_schedule_table(args)
    return config


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
        return names
    return list(values)


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
        use_gradient_clipping=args.use_gradient_clipping, clip_start_value=args.clip_start_value,
        clip_window_size=args.clip_window_size, id2label=id2label,
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


def encoder_state_from_cam(cam_model):
    """The step-1 encoder in timm layout with one [CLS] token (the mean of the class tokens), to start step 2 from."""
    state = {key: value for key, value in cam_model.weaktr.state_dict().items()}
    num_classes = cam_model.config.num_labels
    state["cls_token"] = state["cls_token"].mean(dim=1, keepdim=True)
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


def cam_scheduler(args, optimizer, max_steps, steps_per_epoch):
    """Step 1's timm cosine schedule (per epoch as the authors, or per update), stepped once per update."""
    return UpdateStepCosineScheduler(
        optimizer, num_training_steps=max_steps, steps_per_epoch=steps_per_epoch, num_epochs=args.num_train_epochs,
        warmup_epochs=args.warmup_epochs, warmup_lr_init=args.warmup_learning_rate, lr_min=args.min_learning_rate,
        per=args.cam_lr_schedule,
    )  # fmt: skip


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
    max_steps, steps_per_epoch = training_steps(
        loader, args.num_train_epochs, args.max_train_steps, args.gradient_accumulation_steps
    )
    # Not prepared: one step per update of the global batch on any number of processes.
    scheduler = cam_scheduler(args, optimizer, max_steps, steps_per_epoch)
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
                   cam_best_epoch=state.best_epoch)  # fmt: skip
    if use_masks:
        results.update(cam_selection_rule="train_subset_cam_miou", cam_selection_miou=state.best_metric)
        return
    results.update(cam_selection_rule=CLASSIFICATION_RULE, cam_selection_heldout_loss=-state.best_metric,
                   cam_selection_heldout_split=args.val_split, cam_selection_heldout_samples=len(heldout))  # fmt: skip
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
    # The mask-free rule records a threshold per CAM; the mask-based one the chosen CAM's.
    per_cam = selection.get("per_cam", {})
    threshold = per_cam.get(cam, selection)["threshold"] if args.cam_threshold == "sweep" else args.cam_threshold
    return cam, threshold


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
    results.update(pseudo_label_threshold=threshold, pseudo_label_cam=cam,
                   pseudo_label_choice_rule=pseudo_label_choice_rule(args))  # fmt: skip
    if not has_masks(train):
        accelerator.print("The training split has no ground-truth masks: pseudo-labels and CAMs are not scored.")
        return
    if accelerator.is_main_process:
        scored = {"pseudo_labels": "pseudo_label_crf_miou" if crf else "pseudo_label_miou",
                  "pseudo_labels_nocrf": "pseudo_label_miou"}  # fmt: skip
        for name, folder in folders.items():
            results[scored[name]] = evaluate_pseudo_labels(train, folder, len(class_names) + 1)["mean_iou"]
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
    model = WeakTrForSemanticSegmentation(seg_model_config(args, segmentation_id2label(class_names)))
    if args.seg_init == "backbone":
        report = load_timm_backbone(model, args.seg_backbone, position_interpolation=args.seg_backbone_interpolation)
        logger.info("Step-2 backbone %s: %d tensors loaded, unused %s", args.seg_backbone, len(report.loaded_keys),
                    report.unused_keys)  # fmt: skip
    elif args.seg_init == "cam":
        cam_model = WeakTrForCAM.from_pretrained(os.path.join(args.output_dir, "cam"))
        load_timm_backbone(model, encoder_state_from_cam(cam_model), strict=False)
    processor = WeakTrImageProcessor(size={"height": args.seg_image_size, "width": args.seg_image_size},
                                     size_divisor=args.patch_size, image_mean=list(args.seg_image_mean),
                                     image_std=list(args.seg_image_std))  # fmt: skip
    transform = SegmentationTrainTransform(
        crop_size=args.seg_crop_size, base_size=args.seg_base_size, max_ratio=args.seg_max_ratio,
        antialias=args.seg_antialias, mean=args.seg_image_mean, std=args.seg_image_std,
    )  # fmt: skip
    loader = make_loader(train, transform, SegmentationCollator(), args.seg_per_device_train_batch_size,
                         args.seed, args.dataloader_num_workers)  # fmt: skip
    optimizer = build_seg_optimizer(model, args.seg_learning_rate, args.seg_encoder_lr_scale,
                                    momentum=args.seg_momentum, nesterov=args.seg_nesterov)  # fmt: skip
    model, prepared_optimizer, loader = accelerator.prepare(model, optimizer, loader)
    max_steps, _ = training_steps(
        loader, args.seg_num_train_epochs, args.seg_max_train_steps, args.gradient_accumulation_steps
    )
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
    save_pretrained_atomic(accelerator.unwrap_model(model), os.path.join(args.output_dir, "seg"), processor,
                           accelerator.is_main_process)  # fmt: skip
    release_training_state(accelerator)
    results.update(seg_train_seconds=round(time.time() - start, 1), seg_train_steps=max_steps)


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

    processor = WeakTrImageProcessor(do_resize=False, do_pad=False, image_mean=list(args.seg_image_mean),
                                     image_std=list(args.seg_image_std))  # fmt: skip
    common = dict(window_size=args.window_size, window_stride=args.window_stride, accelerator=accelerator,
                  max_samples=args.eval_samples, base_size=args.eval_base_size, min_size=args.eval_min_size,
                  aux_weight=args.eval_aux_weight, skip_unlabelled=True,
                  image_transform=lambda image: processor(image, return_tensors="pt").pixel_values[0])  # fmt: skip
    crf = EVAL_CRF_PRESETS[args.eval_crf] if args.eval_crf else None
    multi = evaluate_segmentation(model, val, scales=args.eval_scales, flip=True, on_prediction=save_prediction,
                                  crf=crf, **common)  # fmt: skip
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
    if accelerator.is_main_process:
        save_cam_overlays(args, split(dataset, args.train_split), figures, class_names)


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
    if args.print_config:
        print(json.dumps(resolved_config(resolve_batch_sizes(args, 1)), indent=2))
        return None
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
    resolve_batch_sizes(args, accelerator.num_processes)
    accelerator.print(f"Global batch {args.total_train_batch_size} (step 1), {args.seg_total_train_batch_size} "
                      f"(step 2) over {accelerator.num_processes} process(es)")  # fmt: skip
    if args.preset == "demo" and args.dataset_path == "synthetic":
        start = f"backbone {args.backbone}" if args.backbone else "no backbone (random init)"
        accelerator.print(f"weaktr demo: offline run on the built-in synthetic dataset with a small ViT, {start}; "
                          "a demonstration of the whole recipe, not the paper's setting (no ImageNet weights).")
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
        # Each stage starts from the seed: `--stage seg` after a finished step 1 trains the same segmenter (same
        # decoder init) as the stage does inside a whole run.
        set_seed(args.seed)
        runners[stage](args, accelerator, dataset, class_names, results)
        results[f"{stage}_stage_seconds"] = round(time.time() - start, 1)
        if accelerator.is_main_process:
            write_json_atomic(results_path, results)
    if "eval" in stages and args.dataset_path == "synthetic" and accelerator.is_main_process:
        results["trivial_baseline_miou"] = trivial_baseline_miou(split(dataset, args.val_split))
        write_json_atomic(results_path, results)
    if "eval" in stages and accelerator.is_main_process:
        save_summary_figure(results, os.path.join(args.output_dir, "figures", "summary.png"))

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
