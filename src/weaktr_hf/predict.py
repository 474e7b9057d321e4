"""Segment a folder of images with a trained WeakTr model: one palette PNG of class ids per image.

    python -m weaktr_hf.predict --model runs/mine/seg --images photos/ --output_dir masks/ --overlays
    weaktr-predict --model runs/mine/cam --images "photos/*.jpg" --output_dir cams/ --save_cams

`--model` is a folder written by examples/train.py (`seg/` for the segmenter, `cam/` for the step-1 model) or a Hub
id. `--images` is a folder (searched recursively for files PIL can read) or a glob pattern.

Outputs, in `--output_dir`, mirroring the images' sub-folders:
  <name>.png            class ids, palette-coloured, the size of the image as displayed (EXIF orientation applied):
                        0 = background, k = `id2label[k]` of a segmenter (k + 1 = `id2label[k]` of a CAM model).
                        Two inputs with the same stem (a.jpg, a.png) keep their extension: a_jpg.png, a_png.png.
  overlays/<name>.png   with --overlays: the image with the classes blended over it.
  cams/<name>_<class>.png  with --save_cams (CAM model): each predicted class's CAM over the image.

Segmenter (`WeakTrForSemanticSegmentation`): sliding windows, `--scales` and `--flip` as the training script's eval
stage (`weaktr_hf.inference.segment`), optionally the same dense CRF (`--crf`, its `--eval_crf`).
CAM model (`WeakTrForCAM`): the classes whose classification score passes `--class_threshold`, their CAMs
(`--cam`, `--scales`, `--flip`, as the pseudo-label stage: `weaktr_hf.inference.generate_cams`), background score
`--cam_threshold`, optionally the pseudo-label CRF (`--crf`).

Images whose output PNG exists are skipped (outputs are written atomically), so a second run does no work; an
unreadable file is reported and skipped without stopping the run.
"""

import argparse
import glob
import logging
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .configuration_weaktr import WeakTrConfig
from .crf import (
    COCO_PSEUDO_LABEL_CRF,
    COCO_SEGMENTATION_CRF,
    SEGMENTATION_CRF,
    VOC_PSEUDO_LABEL_CRF,
    crf_refine_present_classes,
)
from .image_processing_weaktr import WeakTrImageProcessor, load_image_file, pil_image_to_uint8
from .inference import cams_to_labels, generate_cams, segment
from .modeling_weaktr import WeakTrForCAM, WeakTrForSemanticSegmentation
from .pseudo_labels import _refine_with_crf
from .visualization import overlay_cam, overlay_mask, save_label_png

logger = logging.getLogger("weaktr_hf.predict")

CAM_CHOICES = ("fine_cam", "coarse_cam", "cross_attention")
# The same CRF settings as the training script: --eval_crf for the segmenter, --crf for the pseudo-labels.
SEGMENTATION_CRFS = {"voc12": SEGMENTATION_CRF, "coco14": COCO_SEGMENTATION_CRF}
CAM_CRFS = {"voc12": VOC_PSEUDO_LABEL_CRF, "coco14": COCO_PSEUDO_LABEL_CRF}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="weaktr-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", required=True, help="a trained model folder (seg/ or cam/ of a run) or a Hub id")
    add("--images", required=True, help="a folder of images (searched recursively) or a glob pattern")
    add("--output_dir", required=True)
    add("--overlays", action="store_true", help="also write the classes blended over each image")
    add("--save_cams", action="store_true", help="CAM model: also write each predicted class's CAM over the image")
    add("--scales", type=float, nargs="+", default=[1.0], help="resize factors of the passes (e.g. 0.75 1.0 1.25)")
    add("--flip", action="store_true", help="add horizontally flipped passes")
    add("--window_size", type=int, help="segmenter: sliding-window side (default: the model's image size)")
    add("--window_stride", type=int, help="segmenter: window step (default: 2/3 of the window)")
    add("--crf", choices=sorted(SEGMENTATION_CRFS), help="refine with the dense CRF of this recipe (needs pydensecrf)")
    add("--cam", default="fine_cam", choices=CAM_CHOICES, help="CAM model: the CAM behind the masks")
    add("--cam_threshold", type=float, default=0.43,
        help="CAM model: background score (the run's all_results.json pseudo_label_threshold; 0.43 is the paper's)")
    add("--class_threshold", type=float, default=0.5, help="CAM model: sigmoid score for a class to be present")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def find_images(pattern):
    """(path, name relative to the images' root) of every readable-looking image file, sorted."""
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    if os.path.isdir(pattern):
        root = Path(pattern)
        paths = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    else:
        paths = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    if not paths:
        raise FileNotFoundError(f"--images {pattern!r} matches no image file; pass a folder or a pattern like "
                                "'photos/*.jpg'.")  # fmt: skip
    return sorted((path, path.relative_to(root)) for path in paths)


def output_names(images):
    """The output name (relative, without extension) of each image: its stem, with the extension where stems clash."""
    stems = [str(relative.with_suffix("")) for _, relative in images]
    clashes = {stem for stem in stems if stems.count(stem) > 1}
    return [f"{stem}_{relative.suffix[1:]}" if stem in clashes else stem for stem, (_, relative) in zip(stems, images)]


class Predictor:
    """One loaded model and the options of a run; `__call__(image)` gives the label map and, for CAMs, the maps."""

    def __init__(self, args):
        config = WeakTrConfig.from_pretrained(args.model)
        self.is_cam = "WeakTrForCAM" in (config.architectures or [])
        model_class = WeakTrForCAM if self.is_cam else WeakTrForSemanticSegmentation
        self.model = model_class.from_pretrained(args.model).to(args.device).eval()
        try:
            saved = WeakTrImageProcessor.from_pretrained(args.model)
        except OSError:
            saved = WeakTrImageProcessor(size={"height": config.image_size, "width": config.image_size})
        self.classify = saved  # the model's input size: the CAM model's classifier was trained there
        self.native = WeakTrImageProcessor(do_resize=False, do_pad=False, image_mean=saved.image_mean,
                                           image_std=saved.image_std)  # fmt: skip
        self.args = args
        self.window_size = args.window_size or config.image_size
        self.window_stride = args.window_stride or max(1, round(self.window_size * 2 / 3))
        crfs = CAM_CRFS if self.is_cam else SEGMENTATION_CRFS
        self.crf = dict(crfs[args.crf]) if args.crf else None
        self.id2label = config.id2label

    def __call__(self, image):
        pixel_values = self.native(image, return_tensors="pt").pixel_values.to(self.args.device)
        if not self.is_cam:
            probabilities = segment(self.model, pixel_values, self.window_size, self.window_stride,
                                    scales=self.args.scales, flip=self.args.flip)[0]  # fmt: skip
            if self.crf is not None:
                pixels = pil_image_to_uint8(image)
                return crf_refine_present_classes(pixels, probabilities.cpu().numpy(), **self.crf), None
            return probabilities.argmax(0).cpu().numpy(), None
        with torch.no_grad():
            resized = self.classify(image, return_tensors="pt").pixel_values.to(self.args.device)
            scores = self.model(pixel_values=resized).logits.float().sigmoid()[0]
        present = [int(i) for i in torch.nonzero(scores >= self.args.class_threshold).flatten()]
        cams = generate_cams(self.model, pixel_values, [present], scales=self.args.scales, flip=self.args.flip,
                             cam=self.args.cam)  # fmt: skip
        label_map = cams_to_labels(cams, [present], self.args.cam_threshold)[0].cpu().numpy()
        if self.crf is not None and present:
            label_map = _refine_with_crf(pil_image_to_uint8(image), label_map, present, self.crf)
        return label_map, {i: cams[0, i].cpu().numpy() for i in present}

    def class_name(self, label):
        """The name of a label of the output map (CAM models have no background entry: k + 1 is class k)."""
        return self.id2label[label - 1] if self.is_cam else self.id2label[label]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    images = find_images(args.images)
    predictor = Predictor(args)
    out = Path(args.output_dir)
    written, done, unreadable = 0, 0, []
    for (path, _), name in zip(tqdm(images, desc="predict", dynamic_ncols=True), output_names(images)):
        targets = [out / f"{name}.png"] + ([out / "overlays" / f"{name}.png"] if args.overlays else [])
        if all(target.exists() for target in targets):
            done += 1
            continue
        try:
            image = load_image_file(str(path))  # as displayed (EXIF orientation applied)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            unreadable.append(str(path))
            logger.warning("skipped %s: cannot be read as an image (%s)", path, error)
            continue
        label_map, cams = predictor(image)
        label_map = label_map.astype(np.uint8)
        pixels = pil_image_to_uint8(image) if args.overlays or args.save_cams else None  # 8-bit RGB, alpha on white
        if args.save_cams and cams:
            for class_id, cam in cams.items():
                cam_path = out / "cams" / f"{name}_{predictor.class_name(class_id + 1)}.png"
                cam_path.parent.mkdir(parents=True, exist_ok=True)
                overlay_cam(pixels, cam).save(cam_path)
        if args.overlays:
            targets[1].parent.mkdir(parents=True, exist_ok=True)
            overlay_mask(pixels, label_map).save(targets[1])
        save_label_png(targets[0], label_map)  # last: its presence marks the image as done
        written += 1
    print(f"weaktr-predict: wrote {written} mask(s) to {out}, {done} already done, {len(unreadable)} unreadable"
          + (": " + ", ".join(unreadable) if unreadable else ""))  # fmt: skip
    return {"written": written, "done": done, "unreadable": unreadable}


if __name__ == "__main__":
    main()
