"""
Why does step 2 drop a class its pseudo-labels hold? Retrain the segmenter of a run with a probe, then score it.

    python examples/diagnose_step2.py --output_dir runs/eight-classes-s42 --seed 42 --synthetic_config eight-classes

Give the same flags as the run (every `examples/train.py` flag works: e.g. `--clip_start_value 1.2` to test a change);
its step-1 outputs (`cam/`, `pseudo_labels/`) must be in `--output_dir`. It trains step 2 exactly as `--stage seg`
does (each stage reseeds; the probe's hooks change nothing), scores it as `--stage eval`, and writes
`step2_diagnostics.json` and `step2_diagnostics.md` there (`--diagnostics_name` for another name):

- per class: IoU against the training pseudo-labels (fit) beside IoU on val, pixel shares, and a warning for each
  class the pseudo-labels hold that the segmenter never predicts (`weaktr_hf.diagnostics.class_fit_report`);
- per class and epoch of step 2 (`weaktr_hf.diagnostics.StepTwoProbe`): pixel share in the augmented crops and
  crops where the class covers less than one patch, share of its pixels whose loss is clipped, gradient on its
  logits / mask embedding / patch features, and its decoder class-embedding norm;
- the mIoU the pseudo-labels (train) and the truth (val) keep through the segmenter's patch grid, one pass and the
  evaluation's scales (`weaktr_hf.diagnostics.patch_grid_miou`): how much of a gap the output resolution explains;
- the segmenter's val mIoU as the evaluation scores it, but with each image's prediction restricted to the classes
  of its mask (the image-level labels the pseudo-labels are made with; `evaluate_segmentation(...,
  present_classes_only=True)`): how much of a gap is telling the classes apart rather than finding them.

`--diagnose_only` skips training and evaluation and reports on the run's saved segmenter (no probe then).
The findings on the demo are in docs/step2-diagnosis.md.
"""

import argparse
import ast
import json
import math
import os
import sys
import types

import torch
from tqdm.auto import tqdm

from weaktr_hf import WeakTrForSemanticSegmentation
from weaktr_hf.data.schema import mask_to_array
from weaktr_hf.diagnostics import StepTwoProbe, class_fit_report, dropped_classes, format_fit_report, patch_grid_miou
from weaktr_hf.evaluation import evaluate_segmentation
from weaktr_hf.pseudo_labels import evaluate_pseudo_labels, pseudo_label_dataset, pseudo_label_path
from weaktr_hf.training import write_json_atomic
from weaktr_hf.visualization import load_label_png

HERE = os.path.dirname(os.path.abspath(__file__))
# Measurements averaged per epoch in the Markdown report (the JSON has them all).
SHOWN = ("share", "small", "clipped", "loss", "predicted", "logit_grad", "embedding_grad", "patch_grad",
         "embedding_norm", "embedding_cosine", "mask_norm_bias")  # fmt: skip


def load_recipe():
    """The recipe's names this script uses, from the package (weaktr_hf.recipes / .stages / .train)."""
    from weaktr_hf import recipes, stages, train

    return types.SimpleNamespace(
        PRESETS=recipes.PRESETS, FALLBACKS=recipes.FALLBACKS, parse_args=train.parse_args, main=train.main,
        load_data=stages.load_data, split=stages.split, has_masks=stages.has_masks,
        get_class_names=stages.get_class_names, stages=stages,
    )  # fmt: skip


def probed_training(train_model, probe):
    """`train_model` with the probe attached to the step-2 model while it trains."""

    def run(accelerator, model, *args, log_prefix="train", **kwargs):
        if log_prefix != "seg":
            return train_model(accelerator, model, *args, log_prefix=log_prefix, **kwargs)
        probe.attach(accelerator.unwrap_model(model))
        try:
            return train_model(accelerator, model, *args, log_prefix=log_prefix, **kwargs)
        finally:
            probe.detach()

    return run


def epoch_table(epochs, class_names, key):
    lines = [f"| {key} | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 1) + "|"]
    for epoch in epochs:
        if key in epoch:
            lines.append(f"| epoch {epoch['epoch']} | " + " | ".join(f"{value:.3g}" for value in epoch[key]) + " |")
    return "\n".join(lines)


def patch_grid_ceilings(train, val, pseudo_labels, num_labels, patch_size, scales):
    """The pseudo-labels (train) and the truth (val) through the patch grid, one pass and the evaluation's scales."""

    def pairs(dataset, label_dir):
        masks = dataset.select_columns(["id", "semantic_mask"])
        for example in masks:
            truth = mask_to_array(example["semantic_mask"])
            yield (load_label_png(pseudo_label_path(label_dir, example["id"])) if label_dir else truth), truth

    found = {}
    for name, dataset, label_dir in (("pseudo-labels (train)", train, pseudo_labels), ("truth (val)", val, None)):
        if dataset is None:
            continue
        for label, chosen in (("single scale", (1.0,)), ("multi-scale", scales)):
            progress = tqdm(pairs(dataset, label_dir), total=len(dataset), desc=f"patch grid: {name}, {label}",
                            leave=False, dynamic_ncols=True)  # fmt: skip
            scores = patch_grid_miou(progress, num_labels, patch_size, chosen)
            found[f"{name}, {label}"] = scores["mean_iou"]
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diagnostics_name", default="step2_diagnostics")
    parser.add_argument("--diagnose_only", action="store_true")
    parser.add_argument("--fit_samples", type=int, default=None,
                        help="training images scored against pseudo-labels (default: the run's --fit_report_samples, "
                        "200 where that is 0)")
    parser.add_argument(
        "--preset_value",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="try a preset value that has no flag (e.g. clip_start_value=0.3), repeatable",
    )
    own, train_argv = parser.parse_known_args(argv)
    if own.fit_samples is not None and own.fit_samples < 1:
        parser.error(f"--fit_samples must be at least 1, got {own.fit_samples}.")
    if "--stage" in train_argv:
        parser.error("--stage is chosen by this script (seg, then eval); leave it out.")
    recipe = load_recipe()
    for item in own.preset_value:
        key, _, value = item.partition("=")
        preset = recipe.PRESETS[recipe.parse_args(train_argv).preset]
        if key not in preset and key not in recipe.FALLBACKS:
            parser.error(f"--preset_value {item!r}: {key!r} is no recipe key; see weaktr-train --print_config.")
        preset[key] = ast.literal_eval(value)
    args = recipe.parse_args(train_argv)
    for needed in ("cam", "pseudo_labels"):
        if not own.diagnose_only and not os.path.isdir(os.path.join(args.output_dir, needed)):
            parser.error(f"{args.output_dir}/{needed} is missing: run examples/train.py --stage cam, then --stage "
                         "pseudo, with the same --output_dir and flags first.")  # fmt: skip
    probe = StepTwoProbe()
    results = {}
    if not own.diagnose_only:
        recipe.stages.train_model = probed_training(recipe.stages.train_model, probe)
        recipe.main(train_argv + ["--stage", "seg"])
        results = recipe.main(train_argv + ["--stage", "eval"])
    else:  # the finished run's scores
        path = os.path.join(args.output_dir, "all_results.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                results = json.load(handle)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dataset = recipe.load_data(args)
    class_names = ["background", *recipe.get_class_names(dataset)]
    pseudo_labels = os.path.join(args.output_dir, "pseudo_labels")
    train_split = recipe.split(dataset, args.train_split)
    train = pseudo_label_dataset(train_split, pseudo_labels)
    val = recipe.split(dataset, args.val_split)
    val = val if recipe.has_masks(val) else None  # scored against the truth only where it has masks
    model = WeakTrForSemanticSegmentation.from_pretrained(os.path.join(args.output_dir, "seg")).eval()
    options = recipe.stages.segmentation_eval_options(args)  # the eval stage's window, sizes, aux weight, transform
    fit_samples = own.fit_samples if own.fit_samples is not None else (args.fit_report_samples or 200)
    report = class_fit_report(model, train, val, class_names=class_names, train_samples=fit_samples, **options)
    steps_per_epoch = math.ceil(len(train) / args.seg_total_train_batch_size)
    diagnostics = {"fit_report": report, "classes": class_names, "steps_per_epoch": steps_per_epoch,
                   "training": probe.summary(steps_per_epoch) if probe.rows else None,
                   "seg_val_miou_ms_flip": results.get("seg_val_miou_ms_flip"),
                   "seg_val_per_class_iou": results.get("seg_val_per_class_iou")}  # fmt: skip
    if recipe.has_masks(train_split):  # the pseudo-labels against the truth, per class
        scores = evaluate_pseudo_labels(train_split, pseudo_labels, len(class_names))
        diagnostics["pseudo_label_train_miou"] = scores["mean_iou"]
        diagnostics["pseudo_label_train_per_class_iou"] = dict(zip(class_names, scores["per_category_iou"].tolist()))
        diagnostics["patch_grid"] = patch_grid_ceilings(
            train_split, val, pseudo_labels,
            len(class_names), model.config.patch_size, tuple(args.eval_scales),
        )  # fmt: skip
    if val is not None:  # the eval stage's passes, each image told its own classes
        told = evaluate_segmentation(
            model, val, scales=tuple(args.eval_scales), flip=True, max_samples=args.eval_samples,
            skip_unlabelled=True, present_classes_only=True, show_progress=False, **options,
        )  # fmt: skip
        diagnostics["seg_val_miou_ms_flip_image_labels"] = told["mean_iou"]
        diagnostics["seg_val_per_class_iou_image_labels"] = dict(zip(class_names, told["per_category_iou"].tolist()))
    text = [f"# Step-2 diagnostics of {args.output_dir}", "", format_fit_report(report)]
    truth, segmenter = diagnostics.get("pseudo_label_train_per_class_iou"), diagnostics["seg_val_per_class_iou"]
    if truth and segmenter:
        diagnostics["dropped_classes"] = dropped_classes(truth, segmenter)
        gap = results["seg_val_miou_ms_flip"] - diagnostics["pseudo_label_train_miou"]
        diagnostics["val_minus_pseudo_label_miou"] = gap
        text += [
            "",
            "| class | CRF pseudo-label IoU (train, truth) | segmenter IoU (val, multi-scale + flip) |",
            "|---|---|---|",
        ] + [f"| {name} | {truth[name]:.3f} | {segmenter[name]:.3f} |" for name in class_names]
        text += [
            "",
            (
                f"val mIoU (multi-scale + flip) minus pseudo-label mIoU: {100 * gap:+.1f} points; classes dropped "
                f"(pseudo-label IoU >= 0.2, val IoU < 0.1): {diagnostics['dropped_classes'] or 'none'}"
            ),
        ]
    if "seg_val_miou_ms_flip_image_labels" in diagnostics:
        told = diagnostics["seg_val_per_class_iou_image_labels"]
        text += ["", (f"val mIoU (multi-scale + flip) with each image's prediction restricted to the classes of its "
                      f"mask (the image-level labels the pseudo-labels are made with): "
                      f"{100 * diagnostics['seg_val_miou_ms_flip_image_labels']:.1f}; per class: "
                      + ", ".join(f"{name} {told[name]:.3f}" for name in class_names))]  # fmt: skip
    if diagnostics.get("patch_grid"):
        text += ["", "mIoU through the segmenter's patch grid (each label map averaged per patch and upsampled as the "
                 "logits are: what a segmenter that reproduced it exactly would score):", ""]  # fmt: skip
        text += [f"- {name}: {100 * value:.1f}" for name, value in diagnostics["patch_grid"].items()]
    if diagnostics["training"]:
        for key in SHOWN:
            text += ["", epoch_table(diagnostics["training"], class_names, key)]
    write_json_atomic(os.path.join(args.output_dir, own.diagnostics_name + ".json"), diagnostics)
    with open(os.path.join(args.output_dir, own.diagnostics_name + ".md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(text) + "\n")
    print("\n".join(text))
    return diagnostics


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
