"""`weaktr-train`: WeakTr's whole weakly-supervised segmentation recipe with Accelerate.

    weaktr-train                                   # the offline demo on the built-in synthetic set (CPU, minutes)
    weaktr-train --preset own-deit-s --dataset_path my_photos --backbone deit_small_patch16_224
    accelerate launch -m weaktr_hf.train --preset voc12-deit-s --dataset_path /data/VOCdevkit/VOC2012 \\
        --backbone deit_small_patch16_224 --output_dir runs/voc12

Stages (`--stage`, default all), each reading what the previous one wrote in --output_dir:
  cam     step 1: train the CAM model from image-level labels, keep the best epoch
  pseudo  multi-scale + flip CAMs -> background threshold -> dense CRF -> one pseudo-label PNG per training image
  seg     step 2: train the segmenter on the pseudo-labels with the gradient-clipping loss
  eval    predict the validation split, score it where it has masks, write the results table

Every option's default comes from --preset (shown in brackets below for the chosen preset); `--print_config` prints
the resolved recipe after the same checks as a real run.
"""

import argparse
import json
import logging
import os
import shlex
import sys
import time

from .cli import BooleanFlag, console_script
from .recipes import (
    CAM_NAMES, CRF_NAMES, ENCODER_NAMES, FALLBACKS, LOSS_AVERAGES, PRESETS, STAGES, apply_preset, requested_stages,
    resolve_batch_sizes, resolved_config,
)  # fmt: skip

logger = logging.getLogger("weaktr")
SYNTHETIC_CONFIGURATION_NAMES = ("default", "eight-classes", "shape-only", "small-cluttered")

# (flag, help, argparse keywords). Help texts say what the option does; the preset's value is added to each.
OPTIONS = {
    "Recipe and run": [
        ("--preset", "recipe whose values are every option's default", dict(choices=sorted(PRESETS))),
        ("--stage", "run all stages, or one of them on a run folder that holds the previous ones",
         dict(choices=("all",) + STAGES, default="all")),
        ("--output_dir", "the run folder: models, pseudo-labels, predictions, figures, all_results.json",
         dict(default="outputs/weaktr-demo")),
        ("--overwrite_output_dir", "replace the run already in --output_dir (its files are removed first)",
         dict(action=BooleanFlag, default=False)),
        ("--resume_from_checkpoint", "continue an interrupted run: 'latest' or a checkpoint folder of the stage "
         "being trained (the run must have been started with the same options)", {}),
        ("--print_config", "print the resolved recipe as JSON and exit (loads nothing)",
         dict(action=BooleanFlag, default=False)),
        ("--seed", "seed of every stage (each stage starts from it)", dict(type=int)),
    ],
    "Data": [
        ("--dataset_path", "'synthetic', a VOCdevkit/VOC2012 or COCO root, a folder of your images, a saved dataset or "
         "a Hub id (also --dataset_name)", dict(aliases=("--dataset_name",))),
        ("--train_split", "training split", {}),
        ("--val_split", "validation split ('validation' is used where that is the dataset's name)", {}),
        ("--image_column_name", "image column of a folder / saved / Hub dataset", {}),
        ("--labels_column_name", "image-level labels: class names ('cat;dog', a JSON list) or ids (default 'labels', "
         "else ImageFolder's 'label')", {}),
        ("--mask_column_name", "optional ground-truth mask column (default 'semantic_mask' if present)", {}),
        ("--class_names", "foreground class names, or one text file with a name per line: for a dataset that names "
         "its classes (sub-folders, ClassLabel) the same names in any order, matched by name; for labels written as "
         "ids, the names of ids 0, 1, ... in order (default: the dataset's own names)", dict(nargs="+")),
        ("--validation_split_percentage", "without a validation split, hold out this percentage of the training "
         "images", dict(type=float)),
        ("--on_bad_sample", "unreadable image / unknown label: stop naming the file, or skip it with a log line",
         dict(choices=("raise", "skip"))),
        ("--coco_id_layout", "COCO classes: 90 raw category ids (the authors') or 80 contiguous ones",
         dict(choices=("raw", "contiguous"))),
        ("--voc_labels_from", "VOC image-level labels: the mask's classes where a mask exists (auto), the masks, or "
         "the XML objects", dict(choices=("auto", "mask", "xml"))),
        ("--image_labels_file", "image-level labels from a .npy dict {id: multi-hot} (the authors' cls_labels.npy)",
         {}),
        ("--synthetic_config", "variant of the synthetic set", dict(choices=SYNTHETIC_CONFIGURATION_NAMES)),
        ("--synthetic_num_classes", "synthetic set: foreground classes", dict(type=int)),
        ("--synthetic_image_size", "synthetic set: image side in pixels", dict(type=int)),
        ("--synthetic_num_train", "synthetic set: training images", dict(type=int)),
        ("--synthetic_num_val", "synthetic set: validation images", dict(type=int)),
    ],
    "Models": [
        ("--backbone", "ImageNet init: a timm model name (needs network) or a local timm checkpoint file; 'none' for "
         "random weights", dict(aliases=("--model_name_or_path",))),
        ("--seg_backbone", "step-2 encoder init (default --backbone): a timm name or a local file of those weights",
         {}),
        ("--seg_encoder", "step-2 block layout: vit, dinov2 (LayerScale), eva02 (SwiGLU, q/v bias, RoPE) or dinov3",
         dict(choices=ENCODER_NAMES)),
        ("--seg_intermediate_size", "step-2 encoder MLP width (default --intermediate_size)", dict(type=int)),
        ("--seg_backbone_interpolation", "resize of the --seg_backbone position table to the crop's grid",
         dict(choices=("bilinear", "bicubic"))),
        ("--backbone_arch", "timm name of a weights-only --backbone file; the encoder's config is then read from "
         "timm (also for any timm name other than the paper's, and for a folder saved by timm)", {}),
        ("--seg_backbone_arch", "timm name of a weights-only --seg_backbone file (default --backbone_arch)", {}),
        ("--cam_model_name_or_path", "start step 1 from a saved / converted WeakTrForCAM instead", {}),
        ("--allow_random_init", "let a paper preset train without --backbone (from random weights)",
         dict(action=BooleanFlag, default=False)),
        ("--seg_init", "step-2 encoder init: --seg_backbone, the step-1 encoder, or random",
         dict(choices=("backbone", "cam", "scratch"))),
        ("--patch_size", "ViT patch size", dict(type=int)),
        ("--hidden_size", "ViT width", dict(type=int)),
        ("--num_hidden_layers", "ViT depth", dict(type=int)),
        ("--num_attention_heads", "ViT heads", dict(type=int)),
        ("--intermediate_size", "ViT MLP width", dict(type=int)),
        ("--drop_path_rate", "stochastic depth of both encoders", dict(type=float)),
        ("--layer_norm_eps", "step-1 encoder LayerNorm eps (default 1e-6 with --backbone, else 1e-5)",
         dict(type=float)),
        ("--seg_layer_norm_eps", "step-2 encoder LayerNorm eps (default as step 1)", dict(type=float)),
        ("--aaf_reduction", "channel reduction of the adaptive attention fusion", dict(type=int)),
        ("--aaf_feat_reduction", "feature reduction of the adaptive attention fusion", dict(type=int)),
        ("--fine_cam_scale", "weight of the fine CAM's score in the step-1 loss", dict(type=float)),
        ("--decoder_hidden_size", "step-2 decoder width", dict(type=int)),
        ("--decoder_num_hidden_layers", "step-2 decoder depth", dict(type=int)),
        ("--decoder_num_attention_heads", "step-2 decoder heads", dict(type=int)),
        ("--decoder_intermediate_size", "step-2 decoder MLP width", dict(type=int)),
        ("--decoder_hidden_dropout_prob", "step-2 decoder dropout", dict(type=float)),
        ("--decoder_class_embedding_std",
         "init std of the decoder's class embeddings (unset: initializer_range, 0.02 as the authors')", dict(type=float)),
    ],
    "Step 1 (CAM training)": [
        ("--total_train_batch_size", "global step-1 batch: each process gets it / (processes x accumulation steps)",
         dict(type=int)),
        ("--per_device_train_batch_size", "overrides --total_train_batch_size", dict(type=int)),
        ("--gradient_accumulation_steps", "updates accumulate this many batches (both steps)", dict(type=int)),
        ("--learning_rate", "peak step-1 lr (the authors': lr x global batch / 512)", dict(type=float)),
        ("--weight_decay", "step-1 AdamW weight decay", dict(type=float)),
        ("--decay_all_parameters", "also decay biases, norms and tokens (the authors')", dict(action=BooleanFlag)),
        ("--num_train_epochs", "step-1 epochs", dict(type=int)),
        ("--max_train_steps", "step-1 updates; overrides --num_train_epochs", dict(type=int)),
        ("--warmup_epochs", "step-1 warm-up epochs", dict(type=float)),
        ("--warmup_learning_rate", "step-1 lr at the start of the warm-up", dict(type=float)),
        ("--min_learning_rate", "step-1 cosine floor", dict(type=float)),
        ("--cam_lr_schedule", "timm cosine stepped after each epoch (the authors') or after each update",
         dict(choices=("epoch", "step"))),
        ("--cam_drop_last", "drop the last incomplete step-1 batch of each epoch (the authors')",
         dict(action=BooleanFlag)),
        ("--cam_head_init", "init of the CAM conv head and the attention fusion: PyTorch's defaults or trunc-normal",
         dict(choices=("pytorch", "default"))),
        ("--cam_image_size", "step-1 training crop", dict(type=int)),
        ("--cam_augment", "step-1 augmentation", dict(choices=("timm", "light", "none"))),
        ("--train_length_rule", "training lengths as given in epochs, or as a number of updates within bounds",
         dict(choices=("epochs", "updates"))),
        ("--target_train_updates", "step-1 updates under the updates rule (epochs at least --num_train_epochs)",
         dict(type=int)),
        ("--max_train_epochs", "most step-1 epochs under the updates rule", dict(type=int)),
    ],
    "Step-1 epoch selection and pseudo-labels": [
        ("--cam_eval_samples", "images scored after each epoch to keep the best one (first N)", dict(type=int)),
        ("--cam_eval_split", "split holding the selection images (default: the training split)", {}),
        ("--cam_eval_order", "order before taking the first N: the dataset's, or the COCO annotation file's",
         dict(choices=("dataset", "annotation_file"))),
        ("--cam_eval_ids", "text file of image ids (one per line) to select on instead", {}),
        ("--cam_eval_scales", "scales of the selection CAMs", dict(type=float, nargs="+")),
        ("--cam_eval_flip", "add flipped passes to the selection CAMs", dict(action=BooleanFlag)),
        ("--cam_selection_thresholds", "thresholds scored at each selection (default: --cam_threshold or the sweep)",
         dict(type=float, nargs="+")),
        ("--cam_selection_early_stop", "stop the threshold sweep at the first one that does not improve (the "
         "authors')", dict(action=BooleanFlag)),
        ("--cam_threshold", "background score, or 'sweep' to choose it (by mIoU with masks, Otsu's rule without)",
         {}),
        ("--cam_sweep_thresholds", "thresholds of the sweep", dict(type=float, nargs="+")),
        ("--cam_scales", "scales of the pseudo-label CAMs", dict(type=float, nargs="+")),
        ("--cam_flip", "add flipped passes to the pseudo-label CAMs", dict(action=BooleanFlag)),
        ("--pseudo_label_cam", "CAM behind the pseudo-labels; 'auto' chooses among the three",
         dict(choices=CAM_NAMES + ("auto",))),
        ("--crf", "dense-CRF parameters for the pseudo-labels", dict(choices=CRF_NAMES)),
        ("--no_crf", "skip the dense CRF (pseudo-labels straight from the CAMs)", dict(action=BooleanFlag)),
        ("--pseudo_label_eval_split", "also score the pseudo-labels on this split (VOC: train)", {}),
        ("--cam_eval_subset", "selection images: all, or only those with a mask (your own data: any number of them)",
         dict(choices=("all", "with_masks"))),
    ],
    "Step 2 (segmenter training)": [
        ("--seg_total_train_batch_size", "global step-2 batch, divided over processes", dict(type=int)),
        ("--seg_per_device_train_batch_size", "overrides --seg_total_train_batch_size", dict(type=int)),
        ("--seg_learning_rate", "step-2 decoder lr", dict(type=float)),
        ("--seg_min_learning_rate", "floor of the poly schedule (the encoder ends at its scale x it)",
         dict(type=float)),
        ("--seg_encoder_lr_scale", "step-2 encoder lr as a fraction of the decoder's", dict(type=float)),
        ("--seg_momentum", "SGD momentum", dict(type=float)),
        ("--seg_nesterov", "Nesterov SGD (the authors')", dict(action=BooleanFlag)),
        ("--seg_num_train_epochs", "step-2 epochs", dict(type=int)),
        ("--seg_max_train_steps", "step-2 updates; overrides --seg_num_train_epochs", dict(type=int)),
        ("--seg_target_train_updates", "step-2 updates under the updates rule (epochs at least "
         "--seg_num_train_epochs)", dict(type=int)),
        ("--seg_max_train_epochs", "most step-2 epochs under the updates rule", dict(type=int)),
        ("--seg_image_size", "step-2 model input size", dict(type=int)),
        ("--seg_crop_size", "step-2 training crop", dict(type=int)),
        ("--seg_base_size", "short side before the random ratio of the step-2 augmentation", dict(type=int)),
        ("--seg_max_ratio", "long side capped at this x the base size x the random ratio", dict(type=float)),
        ("--seg_antialias", "antialiased resizing in step-2 augmentation (mmseg/cv2: no)", dict(action=BooleanFlag)),
        ("--seg_image_mean", "step-2 normalisation mean", dict(type=float, nargs=3)),
        ("--seg_image_std", "step-2 normalisation std", dict(type=float, nargs=3)),
        ("--gradient_clipping", "the gradient-clipping loss of step 2 (else plain cross-entropy)",
         dict(action=BooleanFlag, dest="use_gradient_clipping")),
        ("--clip_start_value", "loss value where clipping starts", dict(type=float)),
        ("--loss_average", "step-2 loss mean: over all pixels (the authors'), non-ignored ones, or the mean of each "
         "class's mean", dict(choices=LOSS_AVERAGES)),
        ("--loss_class_balance", "with --loss_average classes: a class weighs (its pixels) ** (1 - this): 1 alike, "
         "0 by pixels", dict(type=float)),
        ("--clip_window_size", "clipping window in pixels", dict(type=int)),
    ],
    "Evaluation": [
        ("--window_size", "sliding window of the segmenter's inference", dict(type=int)),
        ("--window_stride", "stride of the sliding window", dict(type=int)),
        ("--eval_scales", "evaluation scales (with flip)", dict(type=float, nargs="+")),
        ("--eval_samples", "score only the first N validation images", dict(type=int)),
        ("--eval_ids", "text file of validation image ids to score instead of the whole split", {}),
        ("--eval_base_size", "resize each image to this short side before the scales", dict(type=int)),
        ("--eval_min_size", "upsample any pass whose short side is below this", dict(type=int)),
        ("--eval_aux_weight", "add this x the probabilities decoded before the last decoder block", dict(type=float)),
        ("--eval_crf", "also score with the dense CRF on the probabilities", dict(choices=CRF_NAMES)),
        ("--num_visualizations", "figures written per stage", dict(type=int)),
        ("--fit_report_samples", "training images on which the eval stage scores the segmenter against its own "
         "pseudo-labels, per class (0: skip)", dict(type=int)),
        ("--eval_without_masks", "a validation split without masks: evaluated as with masks, or only predicted at one "
         "pass", dict(choices=("evaluate", "predict"))),
    ],
    "Loop, checkpoints, tracking and Hub": [
        ("--dataloader_num_workers", "loader processes", dict(type=int)),
        ("--num_threads", "torch intra-op threads per process (default: torch's choice)", dict(type=int)),
        ("--checkpointing_steps", "save the training state every N updates, or 'epoch'", {}),
        ("--checkpoints_total_limit", "checkpoints kept per stage", dict(type=int)),
        ("--logging_steps", "log the loss every N updates", dict(type=int)),
        ("--with_tracking", "log to --report_to", dict(action=BooleanFlag, default=False)),
        ("--report_to", "tracker for --with_tracking", dict(default="tensorboard")),
        ("--push_to_hub", "push the trained models with their cards (the repository is checked before training)",
         dict(action=BooleanFlag, default=False)),
        ("--hub_model_id", "repository of the segmenter (default: the name of --output_dir)", {}),
        ("--hub_token", "Hub token (default: the one `hf auth login` saved)", {}),
        ("--hub_private_repo", "create the repositories as private", dict(action=BooleanFlag, default=False)),
        ("--license", "licence of the pushed models' cards, e.g. apache-2.0 (your weights: none is assumed)", {}),
    ],
}


def _shown(value):
    if isinstance(value, (tuple, list)):
        return " ".join(str(item) for item in value)
    return value


def build_parser(preset="demo"):
    """The parser; each option's help ends with the value `preset` gives it."""
    defaults = {**FALLBACKS, **PRESETS[preset]}
    parser = argparse.ArgumentParser(
        prog="weaktr-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for title, options in OPTIONS.items():
        group = parser.add_argument_group(title)
        for flag, help_text, keywords in options:
            keywords = dict(keywords)
            aliases = keywords.pop("aliases", ())
            dest = keywords.get("dest", flag.removeprefix("--"))
            value = keywords["default"] if "default" in keywords else defaults.get(dest)
            if flag == "--preset":
                value = preset
            help_text = f"{help_text} [{preset}: {_shown(value)}]" if value is not None else help_text
            group.add_argument(flag, *aliases, help=help_text.replace("%", "%%"), **keywords)
    return parser


def parse_args(argv=None, prog="weaktr-train"):
    """Flags -> the resolved recipe (an `argparse.Namespace`), checked as a run checks it; a bad combination is a
    `weaktr_hf.recipes.RecipeError` naming the option. `prog` starts the command recorded in the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    known, _ = first.parse_known_args(argv)
    args = build_parser(known.preset).parse_args(argv)
    args.preset = args.preset or "demo"
    args.command = prog + " " + shlex.join(argv)
    return apply_preset(args)


def make_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration

    # Several processes but no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU machine):
    # Accelerate only sets up CPU (gloo) process groups when told to use the CPU.
    import torch

    distributed_without_cuda = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=distributed_without_cuda, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )  # fmt: skip


class Run:
    """One run of the recipe in its output folder: `Run(args)` sets up Accelerate, checks the Hub repositories (with
    --push_to_hub), claims the folder and loads the data; `run_stage(name)` runs one stage; `finish()` reports and
    pushes. `stages` lists the stages --stage asks for, in order."""

    def __init__(self, args):
        from accelerate.utils import set_seed

        from . import runs, stages

        self.args, self.runs, self.stages_module = args, runs, stages
        self.accelerator = accelerator = make_accelerator(args)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                            handlers=[logging.StreamHandler(sys.stdout)])  # fmt: skip
        resolve_batch_sizes(args, accelerator.num_processes)
        self.hub_repos = stages.prepare_hub(args) if args.push_to_hub and accelerator.is_main_process else None
        crf_note = stages.check_crf(args, accelerator)
        # The main process claims the folder (or refuses it); the others then read the record it wrote.
        self.record = runs.start_run(args) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        self.record = self.record or runs.read_run(args.output_dir)
        stages.announce_run(args, accelerator)
        if args.num_threads:
            import torch

            torch.set_num_threads(args.num_threads)
        if args.with_tracking:
            accelerator.init_trackers("weaktr", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                        for k, v in vars(args).items() if k != "hub_token"})  # fmt: skip
        set_seed(args.seed)
        self.dataset = stages.load_data(args)
        self.class_names = stages.get_class_names(self.dataset)
        self.results = runs.load_results(args.output_dir, self.record)
        self.results.update(run_id=self.record["run_id"], preset=args.preset, dataset=str(args.dataset_path),
                            command=args.command)  # fmt: skip
        if crf_note:
            self.results["crf_note"] = crf_note
        kept = stages.tuned_values_kept(args)
        if kept:
            self.results["preset_values_kept"] = kept
        self.results_path = os.path.join(args.output_dir, runs.RESULTS_FILE)
        self.stages = requested_stages(args)

    def run_stage(self, stage):
        """Run one stage from the seed; its results replace the stage's earlier ones in all_results.json."""
        from accelerate.utils import set_seed

        args, accelerator, results = self.args, self.accelerator, self.results
        accelerator.print(f"== stage {stage} ==")
        self.runs.begin_stage(args, self.record, stage, results, accelerator.is_main_process)
        before, start = set(results), time.time()
        # Each stage starts from the seed: `--stage seg` after a finished step 1 trains the same segmenter (same
        # decoder init) as the stage does inside a whole run.
        set_seed(args.seed)
        self.stages_module.STAGE_RUNNERS[stage](args, accelerator, self.dataset, self.class_names, results)
        results[f"{stage}_stage_seconds"] = round(time.time() - start, 1)
        self.runs.end_stage(args, self.record, stage, before, results, accelerator.is_main_process)
        if accelerator.is_main_process:
            self.stages_module.write_json_atomic(self.results_path, results)

    def finish(self):
        """Print the results (or why there are none), draw the summary figure, push to the Hub if asked."""
        if self.accelerator.is_main_process:
            self.stages_module.report(self.args, self.results, self.results_path, self.accelerator)
            if self.hub_repos is not None:
                self.stages_module.push_run(self.args, self.hub_repos, self.results)
        self.accelerator.end_training()
        return self.results


def run(args):
    """Run the stages of a resolved recipe; returns the run's results (also in OUTPUT_DIR/all_results.json)."""
    current = Run(args)
    for stage in current.stages:
        current.run_stage(stage)
    return current.finish()


def main(argv=None):
    """Parse, then print the recipe (`--print_config`) or run it. Returns the results (None with --print_config)."""
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(resolved_config(resolve_batch_sizes(args, 1)), indent=2))
        return None
    return run(args)


cli = console_script("weaktr-train")(main)

if __name__ == "__main__":
    sys.exit(cli())
