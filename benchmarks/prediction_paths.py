"""mIoU of one trained segmenter through each prediction path, on a synthetic run's validation split.

    python benchmarks/prediction_paths.py --run_dir outputs/weaktr-demo [--synthetic_config default] [--seed 42]

Paths (docs/using-models.md says which does what):
  eval stage, single scale   weaktr_hf.inference.segment at scale 1 with the run's windows / base / minimum size
                             (what all_results.json's seg_val_miou is)
  eval stage, multi-scale    the same with the run's scales and flip (seg_val_miou_ms_flip)
  pipeline, saved processor  pipeline("image-segmentation") on the folder as the run saved it
  pipeline, eval processor   the same with `evaluation_processor(...)` of the run's settings (what a run saves once
                             the training script is wired to it)
  weaktr-predict             the command's settings (Predictor): with the run's settings, as predict_settings.json
                             gives them; and without any (native size, one scale)

Also the share of pixels where the evaluation processor's pipeline agrees with the eval stage's single-scale
prediction, on the validation images and on drawn 500 x 375 images (synthetic scenes rendered at 500 px, cropped).
The segmenter folder is copied to a temporary folder; the run is only read. Prints one JSON object.
"""

import argparse
import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import numpy as np
import PIL.Image
import torch
from transformers import pipeline

from weaktr_hf import WeakTrForSemanticSegmentation, WeakTrImageProcessor
from weaktr_hf.data import SYNTHETIC_CONFIGURATIONS
from weaktr_hf.data.synthetic import load_synthetic
from weaktr_hf.image_processing_weaktr import evaluation_processor
from weaktr_hf.inference import segment
from weaktr_hf.metrics.mean_iou import confusion_matrix, metrics_from_confusion_matrix
from weaktr_hf.predict import Predictor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--run_dir", required=True, help="a finished synthetic run's --output_dir (seg/ inside)")
    add("--synthetic_config", default="default", choices=sorted(SYNTHETIC_CONFIGURATIONS))
    add("--num_classes", type=int, default=4, help="the run's --synthetic_num_classes (a configuration's wins)")
    add("--image_size", type=int, default=64)
    add("--num_val", type=int, default=100)
    add("--seed", type=int, default=42)
    # The demo preset's evaluation settings (examples/train.py).
    add("--window_size", type=int, default=64)
    add("--window_stride", type=int, default=48)
    add("--base_size", type=int, default=None)
    add("--min_size", type=int, default=59)
    add("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    add("--num_drawn", type=int, default=8, help="drawn 500 x 375 images for the agreement check")
    return parser.parse_args(argv)


def miou(predictions, masks, num_labels):
    matrix = sum(confusion_matrix(p, m, num_labels) for p, m in zip(predictions, masks, strict=True))
    return float(metrics_from_confusion_matrix(matrix)["mean_iou"])


def pipeline_map(segmenter, image, label2id):
    label_map = np.full((image.height, image.width), -1, dtype=np.int64)
    for item in segmenter(image):
        label_map[np.array(item["mask"]) > 0] = label2id[item["label"]]
    return label_map


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    options = {"num_classes": args.num_classes, **SYNTHETIC_CONFIGURATIONS[args.synthetic_config]}
    val = load_synthetic("val", image_size=args.image_size, num_train=0, num_val=args.num_val, seed=args.seed,
                         **options)  # fmt: skip
    drawn_scenes = load_synthetic("val", image_size=500, num_train=0, num_val=args.num_drawn, seed=args.seed + 1,
                                  **options)  # fmt: skip
    drawn = [PIL.Image.fromarray(np.asarray(image)[:375]) for image in drawn_scenes["image"]]
    drawn_masks = [np.asarray(mask, dtype=np.int64)[:375] for mask in drawn_scenes["semantic_mask"]]
    images, masks = list(val["image"]), [np.asarray(mask, dtype=np.int64) for mask in val["semantic_mask"]]

    workdir = tempfile.mkdtemp()
    folder = shutil.copytree(os.path.join(args.run_dir, "seg"), os.path.join(workdir, "seg"))
    model = WeakTrForSemanticSegmentation.from_pretrained(folder).eval()
    saved = WeakTrImageProcessor.from_pretrained(folder)
    num_labels, label2id = model.config.num_labels, model.config.label2id
    native = WeakTrImageProcessor(do_resize=False, image_mean=saved.image_mean, image_std=saved.image_std)
    geometry = {"window_size": args.window_size, "window_stride": args.window_stride, "base_size": args.base_size,
                    "min_size": args.min_size}  # fmt: skip

    def eval_stage(image, scales=(1.0,), flip=False, **changes):
        pixels = native(image, return_tensors="pt").pixel_values
        return segment(model, pixels, scales=scales, flip=flip, **{**geometry, **changes})[0].argmax(0).numpy()

    results = {"run_dir": args.run_dir, "val_images": len(images), "drawn_images": len(drawn)}
    single = [eval_stage(image) for image in images]
    results["eval_single_scale"] = miou(single, masks, num_labels)
    results["eval_multi_scale_flip"] = miou([eval_stage(i, args.scales, True) for i in images], masks, num_labels)

    drawn_single = [eval_stage(image) for image in drawn]
    results["drawn_eval_single_scale"] = miou(drawn_single, drawn_masks, num_labels)
    # The same with the short side resized to the training size first (base_size = the synthetic image size).
    results["drawn_eval_single_scale_base_size"] = miou([eval_stage(image, base_size=args.image_size)
                                                         for image in drawn], drawn_masks, num_labels)  # fmt: skip
    old = pipeline("image-segmentation", model=folder)
    results["pipeline_saved_processor"] = miou([pipeline_map(old, i, label2id) for i in images], masks, num_labels)
    results["drawn_pipeline_saved_processor"] = miou([pipeline_map(old, i, label2id) for i in drawn], drawn_masks,
                                                     num_labels)  # fmt: skip
    results["pipeline_saved_processor_size"] = dict(saved.size)
    evaluation_processor(patch_size=model.config.patch_size, image_mean=saved.image_mean, image_std=saved.image_std,
                         size=saved.size["height"], **geometry).save_pretrained(folder)  # fmt: skip
    new = pipeline("image-segmentation", model=folder)
    piped = [pipeline_map(new, image, label2id) for image in images]
    results["pipeline_eval_processor"] = miou(piped, masks, num_labels)
    results["agreement_with_eval_single_scale_val"] = float(
        np.mean([(p == s).mean() for p, s in zip(piped, single, strict=True)])
    )
    drawn_piped = [pipeline_map(new, image, label2id) for image in drawn]
    results["drawn_pipeline_eval_processor"] = miou(drawn_piped, drawn_masks, num_labels)
    results["agreement_with_eval_single_scale_drawn_500x375"] = float(
        np.mean([(p == s).mean() for p, s in zip(drawn_piped, drawn_single, strict=True)])
    )

    for name, settings in (("predict_run_settings", dict(scales=args.scales, flip=True, **geometry)),
                           ("predict_without_settings", {})):  # fmt: skip
        flags = {"scales": None, "flip": None, "window_size": None, "window_stride": None, "base_size": 0,
                 "min_size": 0, "aux_weight": None, "crf": None, "cam": None, "cam_threshold": None,
                 "class_threshold": None, **settings}  # fmt: skip
        if not settings:  # the command as it was: the image's own size, windows of the model's image size
            flags.update(window_size=model.config.image_size)
        predictor = Predictor(SimpleNamespace(model=folder, device="cpu", **flags))
        results[name] = miou([predictor(image)[0] for image in images], masks, num_labels)
        results[f"{name}_settings"] = predictor.settings
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
