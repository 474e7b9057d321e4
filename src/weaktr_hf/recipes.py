"""WeakTr's recipes as data: the offline demo and the authors' VOC / COCO presets, each value with its source.

A recipe is a flat table of hyper-parameters. `apply_preset` fills every option the user left unset from the preset,
then from `FALLBACKS`, and checks the result the same way for a real run and for `--print_config`;
`resolve_batch_sizes` splits the global batches over processes. Nothing here loads a model or a dataset.
"""

import json
import math
import os

STAGES = ("cam", "pseudo", "seg", "eval")
CAM_NAMES = ("coarse_cam", "fine_cam", "cross_attention")
ENCODER_NAMES = ("dinov2", "dinov3", "eva02", "vit")  # the step-2 block layouts (weaktr_hf.configuration_weaktr.ENCODER_VARIANTS)
LOSS_AVERAGES = ("all_pixels", "valid_pixels", "classes")  # weaktr_hf.configuration_weaktr.LOSS_AVERAGES
# timm's ImageNet statistics (timm.data.constants IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class RecipeError(ValueError):
    """A recipe that cannot run as asked: the message names the option and what to do."""


# Every hyper-parameter of a recipe. Flags given on the command line override the preset's value; keys a preset does
# not set take FALLBACKS. Batch sizes are global (`total_train_batch_size`, `seg_total_train_batch_size`): each process
# gets global / (processes x accumulation steps), and schedules count updates of the global batch.
# The demo's backbone: the demo-sized ViT pre-trained on formula-driven fractals (no natural image, no download) by
# examples/pretrain_backbone.py; it ships inside the package (its card: weaktr_hf/demo_backbone/README.md).
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
        # at the same fraction of the chance-level loss as the paper's 1.2 with 21 classes: 1.2 x ln 5 / ln 21 = 0.63.
        # At 1.2 (75% of ln 5) it starts within the first steps, and the classes not yet learned (their pixels above
        # the cap, so without gradient) stay at IoU 0 (README, "The offline demo, measured").
        clip_start_value=0.63, clip_window_size=32,
        # Step 2 learns every class its pseudo-labels hold (docs/step2-diagnosis.md): class embeddings of std 1.0
        # (at the authors' 0.02 all classes leave the decoder with nearly one mask embedding, cosine 0.99), and the
        # loss averaged over classes, each weighing the square root of its pixel count (a plain pixel mean lets the
        # background crowd out the small classes within 630 updates). Paper presets: 0.02 and the pixel mean.
        decoder_class_embedding_std=1.0, loss_average="classes", loss_class_balance=0.5,
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
# What a paper preset tuned on its own dataset: kept (and named in one line at the start) when it runs on another.
DATASET_TUNED = ("cam_threshold", "pseudo_label_cam", "cam_sweep_thresholds", "crf", "eval_crf", "num_train_epochs",
                 "seg_num_train_epochs", "train_split", "cam_eval_split", "cam_eval_samples")  # fmt: skip
# Dense-CRF parameter sets by name (weaktr_hf.crf): pseudo-labels (`crf`) and evaluation (`eval_crf`).
CRF_NAMES = ("coco14", "voc12")

# Your own photos (`own-deit-s`, and `own-<backbone>` for each step-2 backbone): the authors' DeiT-S recipe in
# everything that does not depend on VOC; what VOC tuned is chosen from the data by a rule, and the rule recorded is
# the rule used (all_results.json: cam_selection_rule, pseudo_label_choice_rule, cam_train_epochs, seg_train_epochs).
# - Pseudo-label CAM and threshold: swept on the training images that have a mask (any number of them), each CAM at
#   its own best threshold; with no mask at all, the mask-free rule of weaktr_hf.selection (Otsu's threshold, the CAM
#   whose passes agree most). VOC's 0.43 on the fine CAM was tuned on VOC's masks.
# - Training length in optimizer updates: the authors' number of updates on VOC train_aug at their global batch (step
#   1: 60 epochs x 165 updates of 64 images = 9,900; step 2: 100 epochs x 2,646 updates of 4 = 264,600; 10,582
#   images, Training.md:23), never fewer epochs than theirs (60 / 100) and at most 5 x their epochs (300 / 500): a
#   folder of 500 photos gets 300 step-1 epochs (2,400 updates) instead of 60 (480 updates), a VOC-sized one the same
#   updates as VOC.
# - Held-out photos without masks are only predicted (scale 1.0 at the step-2 base size, no flip, no CRF) for the
#   predictions and figures; with masks they are scored with the authors' evaluation geometry.
VOC_TRAIN_AUG_IMAGES = 10582  # Training.md:23 (voc12/train_aug_id.txt)
AUTHORS_STEP1_UPDATES = 60 * (VOC_TRAIN_AUG_IMAGES // 64)  # drop_last batches of 64 (main.py:251): 9,900
AUTHORS_STEP2_UPDATES = 100 * math.ceil(VOC_TRAIN_AUG_IMAGES / 4)  # 264,600
OWN_DATA = dict(
    train_split="train", cam_eval_split=None, pseudo_label_eval_split=None, cam_eval_samples=500,
    cam_eval_subset="with_masks", pseudo_label_cam="auto", cam_threshold="sweep",
    cam_sweep_thresholds=tuple(round(0.05 * i, 2) for i in range(1, 20)),  # 0.05 ... 0.95: any CAM, any data
    cam_selection_thresholds=None, cam_selection_early_stop=False,
    train_length_rule="updates", target_train_updates=AUTHORS_STEP1_UPDATES, max_train_epochs=300,
    seg_target_train_updates=AUTHORS_STEP2_UPDATES, seg_max_train_epochs=500,
    eval_without_masks="predict",
)  # fmt: skip
# Past the paper: step 2 on DINOv3 (Simeoni et al. 2025; not in the authors' code, so not a paper recipe). Step 1
# stays DeiT-S as in the authors' recipe; the step-2 encoder's config (registers, rotary embedding) is read from timm
# (weaktr_hf.timm_backbone.prepare_timm_backbone) and the decoder follows its width as the authors' Segmenter does
# for base sizes (OR/model/factory.py:119-125). DINOv3's LVD-1689M weights were trained with ImageNet's statistics.
DINOV3_STEP2 = {
    "dinov3-s": dict(seg_backbone="vit_small_patch16_dinov3.lvd1689m", seg_encoder="dinov3",
                     seg_image_mean=IMAGENET_DEFAULT_MEAN, seg_image_std=IMAGENET_DEFAULT_STD),
    "dinov3-b": dict(seg_backbone="vit_base_patch16_dinov3.lvd1689m", seg_encoder="dinov3",
                     seg_image_mean=IMAGENET_DEFAULT_MEAN, seg_image_std=IMAGENET_DEFAULT_STD),
}  # fmt: skip
for _backbone, _step2 in DINOV3_STEP2.items():
    PRESETS[f"voc12-{_backbone}"] = dict(PRESETS["voc12-deit-s"], **_step2)
PRESETS["own-deit-s"] = dict(PRESETS["voc12-deit-s"], **OWN_DATA)
for _backbone, _step2 in {**STEP2_BACKBONES, **DINOV3_STEP2}.items():
    PRESETS[f"own-{_backbone}"] = dict(PRESETS["own-deit-s"], **_step2)

FALLBACKS = dict(
    dataset_path="synthetic", train_split="train", val_split="val", seed=42, gradient_accumulation_steps=1,
    dataloader_num_workers=0, checkpoints_total_limit=2, logging_steps=10, max_train_steps=None,
    seg_max_train_steps=None, num_visualizations=4, crf="voc12", use_gradient_clipping=True, backbone=None,
    seg_backbone=None, seg_encoder="vit", seg_intermediate_size=None, seg_backbone_interpolation=None,
    cam_model_name_or_path=None, num_threads=None, backbone_arch=None, seg_backbone_arch=None,
    # Package defaults where the authors' recipe is not the point (the demo): a per-update cosine from 0 to 0 and a
    # poly decay to 0, decay-free biases and tokens, scales applied to the native image, no eval CRF or ensemble.
    cam_lr_schedule="step", warmup_learning_rate=0.0, min_learning_rate=0.0, decay_all_parameters=False,
    cam_head_init="default", layer_norm_eps=None, seg_layer_norm_eps=None, cam_drop_last=False, cam_eval_split=None,
    cam_eval_order="dataset", cam_eval_ids=None,
    cam_eval_scales=None, cam_eval_flip=False, cam_selection_thresholds=None, cam_selection_early_stop=False,
    seg_min_learning_rate=0.0, seg_nesterov=False, seg_momentum=0.9, seg_max_ratio=4, seg_antialias=True,
    seg_image_mean=IMAGENET_DEFAULT_MEAN, seg_image_std=IMAGENET_DEFAULT_STD,
    eval_base_size=None, eval_min_size=None, eval_aux_weight=0.0, eval_crf=None, eval_ids=None,
    coco_id_layout="contiguous", voc_labels_from="auto", image_labels_file=None, pseudo_label_eval_split=None,
    validation_split_percentage=10.0, on_bad_sample="raise", synthetic_config="default", license=None,
    cam_eval_subset="all", train_length_rule="epochs", target_train_updates=None, max_train_epochs=None,
    seg_target_train_updates=None, seg_max_train_epochs=None, eval_without_masks="evaluate",
    decoder_class_embedding_std=None, fit_report_samples=200, loss_average="all_pixels",
    loss_class_balance=1.0,
)  # fmt: skip



def apply_preset(args):
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
        raise RecipeError(f"--preset {args.preset} needs --dataset_path (a VOCdevkit/VOC2012 or COCO root, a folder of "
                          "your images, a saved dataset or a Hub id).")
    if args.cam_threshold != "sweep":
        try:
            args.cam_threshold = float(args.cam_threshold)
        except ValueError:
            raise RecipeError(f"--cam_threshold must be a number or 'sweep', got {args.cam_threshold!r}.") from None
    if args.checkpointing_steps not in (None, "epoch"):
        if not str(args.checkpointing_steps).isdigit():
            raise RecipeError(
                f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}."
            )
        args.checkpointing_steps = int(args.checkpointing_steps)
    args.seg_backbone = args.seg_backbone or args.backbone
    args.seg_backbone_arch = args.seg_backbone_arch or args.backbone_arch
    if args.seg_init == "cam" and args.seg_encoder != "vit":
        raise RecipeError(f"--seg_init cam starts step 2 from the step-1 encoder, a plain ViT; --seg_encoder "
                          f"{args.seg_encoder} needs --seg_init backbone (its pretrained weights) or scratch.")  # fmt: skip
    if args.use_gradient_clipping and args.seg_crop_size < args.clip_window_size:
        raise RecipeError(f"--seg_crop_size {args.seg_crop_size} is smaller than --clip_window_size "
                          f"{args.clip_window_size}: the only clipping window would be the whole crop, i.e. plain "
                          "global-mean clipping. Use a window at most the crop size, or --no_gradient_clipping.")  # fmt: skip
    check_pretrained_init(args)
    return args


def requested_stages(args):
    """The stages `--stage` asks for, in order."""
    return STAGES if args.stage == "all" else (args.stage,)


def check_pretrained_init(args):
    """A paper preset trained from random weights is no reproduction: stop unless `--allow_random_init` says so."""
    stages = requested_stages(args)
    missing = []
    if "cam" in stages and not (args.backbone or args.cam_model_name_or_path):
        missing.append("step 1 needs --backbone (ImageNet weights) or --cam_model_name_or_path")
    if "seg" in stages and args.seg_init == "backbone" and not args.seg_backbone:
        missing.append("step 2 (--seg_init backbone) needs --seg_backbone or --backbone")
    if missing and args.preset != "demo" and not args.allow_random_init:
        raise RecipeError(f"--preset {args.preset}: " + "; ".join(missing) + ". Without them training would start "
                          "from random weights; pass --allow_random_init to do that anyway.")
    if args.seg_init == "backbone" and not args.seg_backbone:
        args.seg_init = "scratch"


def resolve_batch_sizes(args, num_processes):
    """Per-device batch sizes from the global ones (or the global ones from a per-device override)."""
    shards = num_processes * args.gradient_accumulation_steps
    for prefix in ("", "seg_"):
        per_device, total = f"{prefix}per_device_train_batch_size", f"{prefix}total_train_batch_size"
        if getattr(args, per_device) is None:
            if getattr(args, total) % shards:
                raise RecipeError(
                    f"--{total} {getattr(args, total)} is not divisible by {num_processes} processes x "
                    f"{args.gradient_accumulation_steps} accumulation steps; choose a global batch that is, or set "
                    f"--{per_device}."
                )
            setattr(args, per_device, getattr(args, total) // shards)
        setattr(args, total, getattr(args, per_device) * shards)
    return args


def lr_schedule_table(args):
    """The lr of both steps at a few points, for the global batch on one process (`--print_config`)."""
    import torch

    from .training import build_scheduler

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
    config["rules"] = recipe_rules(args)
    return config


def recipe_rules(args):
    """In words, how the run chooses what the data decides (`--print_config`)."""
    rules = {}
    if args.cam_threshold == "sweep" or args.pseudo_label_cam == "auto":
        where = "the training images that have a mask" if args.cam_eval_subset == "with_masks" else (
            f"the first {args.cam_eval_samples or 'all'} images of {args.cam_eval_split or args.train_split!r}")
        rules["pseudo_label_choice"] = (
            f"CAM ({'one of ' + ', '.join(CAM_NAMES) if args.pseudo_label_cam == 'auto' else args.pseudo_label_cam}) "
            f"and threshold (sweep {list(args.cam_sweep_thresholds)}) by mIoU on {where}; without masks, Otsu's "
            "threshold and the CAM whose passes agree most (weaktr_hf.selection)")
    else:
        rules["pseudo_label_choice"] = f"given: {args.pseudo_label_cam} at {args.cam_threshold}"
    if args.train_length_rule == "updates":
        rules["training_length"] = (
            f"step 1: {args.target_train_updates} updates as epochs, at least {args.num_train_epochs} and at most "
            f"{args.max_train_epochs}; step 2: {args.seg_target_train_updates} updates, at least "
            f"{args.seg_num_train_epochs} and at most {args.seg_max_train_epochs} epochs")
    else:
        rules["training_length"] = f"step 1: {args.num_train_epochs} epochs; step 2: {args.seg_num_train_epochs} epochs"
    if args.eval_without_masks == "predict":
        rules["evaluation_without_masks"] = "predictions and figures only: scale 1.0, no flip, no CRF"
    return rules


def epochs_for(updates_per_epoch, epochs, target_updates=None, max_epochs=None):
    """Epochs of a stage: `epochs`, or under the updates rule the epochs that make `target_updates`, at least
    `epochs` and at most `max_epochs`."""
    if target_updates is None:
        return epochs
    wanted = math.ceil(target_updates / max(updates_per_epoch, 1))
    return max(epochs, min(wanted, max_epochs or wanted))



def cam_scheduler(args, optimizer, max_steps, steps_per_epoch):
    """Step 1's timm cosine schedule (per epoch as the authors, or per update), stepped once per update."""
    from .training import UpdateStepCosineScheduler

    return UpdateStepCosineScheduler(
        optimizer, num_training_steps=max_steps, steps_per_epoch=steps_per_epoch, num_epochs=args.num_train_epochs,
        warmup_epochs=args.warmup_epochs, warmup_lr_init=args.warmup_learning_rate, lr_min=args.min_learning_rate,
        per=args.cam_lr_schedule,
    )  # fmt: skip
