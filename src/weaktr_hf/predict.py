"""Segment a folder of images with a trained WeakTr model: one palette PNG of class ids per image.

    weaktr-predict --model runs/mine/seg --images photos/ --output_dir masks/ --overlays
    weaktr-predict --model runs/mine/cam --images "photos/*.jpg" --output_dir cams/ --save_cams

`--model` is a folder written by the training script (`seg/` for the segmenter, `cam/` for the step-1 model), a
converted checkpoint, or a Hub id. `--images` is a folder (searched recursively for files PIL can read, leaving out
`--output_dir`) or a glob pattern.

Settings, each from the first of: the flag; the model folder's `predict_settings.json` (the run's evaluation
settings, and for a step-1 model the CAM and threshold the run chose); the saved image processor's geometry
(`base_size`, `min_size`, `window_size`, `window_stride`); the earlier defaults (native resolution, windows of the
model's image size, one scale, fine CAM at 0.43). `--base_size 0` keeps the image's own size.

Outputs, in `--output_dir`, mirroring the images' sub-folders:
  <name>.png            class ids, palette-coloured, the size of the image as displayed (EXIF orientation applied):
                        0 = background, k = `id2label[k]` of a segmenter (k + 1 = `id2label[k]` of a CAM model).
                        Two inputs with the same stem (a.jpg, a.png) keep their extension (a_jpg.png, a_png.png);
                        a name still taken gets a number (a_png_2.png).
  overlays/<name>.png   with --overlays: the image with the classes blended over it.
  cams/<name>_<class>.png  with --save_cams (CAM model): each predicted class's CAM over the image.
  predict_record.json   the model's hash and the settings that made the masks.

Segmenter (`WeakTrForSemanticSegmentation`): `weaktr_hf.inference.segment` with the settings above (windows,
scales, flip, base / minimum size, the decoder ensemble), optionally the dense CRF (`--crf`, the eval stage's).
CAM model (`WeakTrForCAM`): the classes whose classification score passes `--class_threshold`, their CAMs
(`--cam`, `--scales`, `--flip`, as the pseudo-label stage: `weaktr_hf.inference.generate_cams`), background score
`--cam_threshold`, optionally the pseudo-label CRF (`--crf`).

A second run into the same `--output_dir` with the same model and settings skips the images already done (outputs
are written atomically); with another model or other settings it stops, unless `--overwrite` redoes every image.
An unreadable file is reported and skipped without stopping the run. Exit status 0 on success; a usage error prints
one line and exits 2.
"""

import argparse
import glob
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers.utils import cached_file

from .configuration_weaktr import WeakTrConfig
from .crf import (
    COCO_PSEUDO_LABEL_CRF,
    COCO_SEGMENTATION_CRF,
    SEGMENTATION_CRF,
    VOC_PSEUDO_LABEL_CRF,
    crf_refine_present_classes,
)
from .image_processing_weaktr import WeakTrImageProcessor, load_image_file, pil_image_to_uint8, resolved_window_stride
from .inference import cams_to_labels, generate_cams, segment
from .modeling_weaktr import WeakTrForCAM, WeakTrForSemanticSegmentation
from .pseudo_labels import _refine_with_crf
from .visualization import overlay_cam, overlay_mask, save_label_png

logger = logging.getLogger("weaktr_hf.predict")

CAM_CHOICES = ("fine_cam", "coarse_cam", "cross_attention")
# The same CRF settings as the training script: --eval_crf for the segmenter, --crf for the pseudo-labels.
SEGMENTATION_CRFS = {"voc12": SEGMENTATION_CRF, "coco14": COCO_SEGMENTATION_CRF}
CAM_CRFS = {"voc12": VOC_PSEUDO_LABEL_CRF, "coco14": COCO_PSEUDO_LABEL_CRF}
# Beside a saved model: the settings a run evaluated it with (`save_predict_settings`).
SETTINGS_FILE = "predict_settings.json"
# In --output_dir: the model hash and settings that made its masks.
RECORD_FILE = "predict_record.json"
SEGMENTER_SETTINGS = ("scales", "flip", "window_size", "window_stride", "base_size", "min_size", "aux_weight", "crf")
CAM_SETTINGS = ("scales", "flip", "cam", "cam_threshold", "class_threshold", "crf")
# What weaktr-predict did before a model recorded its settings (and what a folder without them still gets).
FALLBACK_SETTINGS = {"scales": [1.0], "flip": False, "cam": "fine_cam", "cam_threshold": 0.43, "class_threshold": 0.5,
                     "crf": None, "base_size": None, "min_size": None, "aux_weight": None}  # fmt: skip
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PredictError(Exception):
    """A usage error of weaktr-predict: printed as one line, exit status 2."""


def save_predict_settings(folder, **settings):
    """Write `predict_settings.json` beside a saved model: what `weaktr-predict` then uses unless a flag overrides.

    Segmenter keys: `scales`, `flip`, `window_size`, `window_stride`, `base_size`, `min_size`, `aux_weight`, `crf`
    (a `--crf` name or None). CAM model keys: `scales`, `flip`, `cam`, `cam_threshold`, `class_threshold`, `crf`.
    Unknown keys are an error naming them.
    """
    unknown = sorted(set(settings) - set(SEGMENTER_SETTINGS) - set(CAM_SETTINGS))
    if unknown:
        raise ValueError(f"unknown predict settings {unknown}; known: {sorted(set(SEGMENTER_SETTINGS + CAM_SETTINGS))}")
    if settings.get("scales") is not None:
        settings["scales"] = [float(scale) for scale in settings["scales"]]
    path = os.path.join(folder, SETTINGS_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path


def load_predict_settings(model):
    """The `predict_settings.json` of a model folder or Hub id, or {} when it has none."""
    path = cached_file(model, SETTINGS_FILE, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)  # fmt: skip
    if path is None:
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def model_hash(model):
    """SHA-256 of the model's weight file (a folder's or a Hub id's), so a record tells one model from another."""
    for name in WEIGHT_FILES:
        path = cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)  # fmt: skip
        if path is not None:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()
    raise PredictError(f"--model {model!r} has no {' or '.join(WEIGHT_FILES)}; pass a folder written by "
                       "save_pretrained or a Hub model id.")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="weaktr-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", required=True, help="a trained model folder (seg/ or cam/ of a run), a converted one, or a Hub id")
    add("--images", required=True, help="a folder of images (searched recursively) or a glob pattern")
    add("--output_dir", required=True)
    add("--overlays", action="store_true", help="also write the classes blended over each image")
    add("--save_cams", action="store_true", help="CAM model: also write each predicted class's CAM over the image")
    add("--overwrite", action="store_true",
        help="redo every image, also when --output_dir holds masks of another model or other settings")
    add("--scales", type=float, nargs="+", help="resize factors of the passes (e.g. 0.75 1.0 1.25)")
    add("--flip", action=argparse.BooleanOptionalAction, default=None, help="add horizontally flipped passes")
    add("--base_size", type=int, help="segmenter: resize each image to this short side before the scales "
        "(0: the image's own size)")
    add("--min_size", type=int, help="segmenter: upsample passes whose short side is below this (0: never)")
    add("--window_size", type=int, help="segmenter: sliding-window side")
    add("--window_stride", type=int, help="segmenter: window step (default: 2/3 of the window)")
    add("--aux_weight", type=float, help="segmenter: decoder ensemble weight (default: the model's config)")
    add("--crf", choices=sorted(SEGMENTATION_CRFS) + ["none"],
        help="refine with the dense CRF of this recipe (needs pydensecrf); none: no CRF")
    add("--cam", choices=CAM_CHOICES, help="CAM model: the CAM behind the masks")
    add("--cam_threshold", type=float, help="CAM model: background score")
    add("--class_threshold", type=float, help="CAM model: sigmoid score for a class to be present")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def find_images(pattern, exclude=None):
    """(path, name relative to the images' root) of every readable-looking image file, sorted; nothing inside the
    folder `exclude` (the output folder) is taken."""
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    if os.path.isdir(pattern):
        root = Path(pattern)
        paths = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    else:
        paths = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    if exclude is not None:
        excluded = Path(exclude).resolve()
        paths = [p for p in paths if excluded not in p.resolve().parents]
    if not paths:
        raise PredictError(f"--images {pattern!r} matches no image file (outside --output_dir); pass a folder or a "
                           "pattern like 'photos/*.jpg'.")  # fmt: skip
    return sorted((path, path.relative_to(root)) for path in paths)


def output_names(images):
    """The output name (relative, without extension) of each image: its stem, with the extension where stems clash,
    and a number where that name is still taken; unique whatever the file names."""
    stems = [str(relative.with_suffix("")) for _, relative in images]
    clashes = {stem for stem in stems if stems.count(stem) > 1}
    wanted = [f"{stem}_{relative.suffix[1:]}" if stem in clashes else stem for stem, (_, relative) in zip(stems, images)]
    names, taken = [], set()
    for name in wanted:
        unique, number = name, 2
        while unique.lower() in taken:  # also on case-insensitive file systems
            unique, number = f"{name}_{number}", number + 1
        taken.add(unique.lower())
        names.append(unique)
    return names


def resolve_settings(args, config, processor, is_cam):
    """The settings of this run: each flag, else the model's `predict_settings.json`, else the saved processor's
    geometry, else `FALLBACK_SETTINGS`."""
    saved = load_predict_settings(args.model)
    geometry = {name: getattr(processor, name, None) for name in ("base_size", "min_size", "window_size", "window_stride")}
    names = CAM_SETTINGS if is_cam else SEGMENTER_SETTINGS
    settings = {}
    for name in names:
        flag = getattr(args, name, None)
        if flag is not None:
            settings[name] = flag
        elif saved.get(name) is not None:
            settings[name] = saved[name]
        elif geometry.get(name) is not None:
            settings[name] = geometry[name]
        else:
            settings[name] = FALLBACK_SETTINGS.get(name)
    if settings.get("crf") == "none":
        settings["crf"] = None
    if not is_cam:
        for name in ("base_size", "min_size"):
            settings[name] = settings[name] or None  # 0: no resize / never upsample
        settings["window_size"] = settings["window_size"] or config.image_size
        settings["window_stride"] = resolved_window_stride(settings["window_size"], settings["window_stride"])
        if settings["aux_weight"] is None:
            settings["aux_weight"] = config.auxiliary_ensemble_weight
    settings["scales"] = [float(scale) for scale in settings["scales"]]
    return settings


class Predictor:
    """One loaded model and the settings of a run; `__call__(image)` gives the label map and, for CAMs, the maps."""

    def __init__(self, args):
        try:
            config = WeakTrConfig.from_pretrained(args.model)
        except (OSError, ValueError) as error:
            raise PredictError(f"--model {args.model!r} cannot be loaded as a WeakTr model: "
                               f"{' '.join(str(error).split())[:300]}") from None  # fmt: skip
        self.is_cam = "WeakTrForCAM" in (config.architectures or [])
        model_class = WeakTrForCAM if self.is_cam else WeakTrForSemanticSegmentation
        self.model = model_class.from_pretrained(args.model).to(args.device).eval()
        try:
            saved = WeakTrImageProcessor.from_pretrained(args.model)
        except OSError:
            saved = WeakTrImageProcessor(size={"height": config.image_size, "width": config.image_size})
        # The CAM model's classifier was trained at its input size: a processor resizing to `size` only.
        self.classify = WeakTrImageProcessor(size=saved.size, image_mean=saved.image_mean, image_std=saved.image_std,
                                             size_divisor=saved.size_divisor)  # fmt: skip
        self.native = WeakTrImageProcessor(do_resize=False, do_pad=False, image_mean=saved.image_mean,
                                           image_std=saved.image_std)  # fmt: skip
        self.args = args
        self.settings = resolve_settings(args, config, saved, self.is_cam)
        crfs = CAM_CRFS if self.is_cam else SEGMENTATION_CRFS
        self.crf = dict(crfs[self.settings["crf"]]) if self.settings["crf"] else None
        self.id2label = config.id2label

    def __call__(self, image):
        pixel_values = self.native(image, return_tensors="pt").pixel_values.to(self.args.device)
        settings = self.settings
        if not self.is_cam:
            probabilities = segment(
                self.model, pixel_values, settings["window_size"], settings["window_stride"],
                scales=settings["scales"], flip=settings["flip"], base_size=settings["base_size"],
                min_size=settings["min_size"], aux_weight=settings["aux_weight"],
            )[0]  # fmt: skip
            if self.crf is not None:
                pixels = pil_image_to_uint8(image)
                return crf_refine_present_classes(pixels, probabilities.cpu().numpy(), **self.crf), None
            return probabilities.argmax(0).cpu().numpy(), None
        with torch.no_grad():
            resized = self.classify(image, return_tensors="pt").pixel_values.to(self.args.device)
            scores = self.model(pixel_values=resized).logits.float().sigmoid()[0]
        present = [int(i) for i in torch.nonzero(scores >= settings["class_threshold"]).flatten()]
        cams = generate_cams(self.model, pixel_values, [present], scales=settings["scales"], flip=settings["flip"],
                             cam=settings["cam"])  # fmt: skip
        label_map = cams_to_labels(cams, [present], settings["cam_threshold"])[0].cpu().numpy()
        if self.crf is not None and present:
            label_map = _refine_with_crf(pil_image_to_uint8(image), label_map, present, self.crf)
        return label_map, {i: cams[0, i].cpu().numpy() for i in present}

    def class_name(self, label):
        """The name of a label of the output map (CAM models have no background entry: k + 1 is class k)."""
        return self.id2label[label - 1] if self.is_cam else self.id2label[label]


def check_record(out, record, overwrite):
    """Compare `--output_dir`'s record with this run's: equal -> resume; different -> stop, unless `overwrite`.
    Returns True when existing outputs may be kept."""
    path = out / RECORD_FILE
    if not path.exists():
        has_outputs = out.is_dir() and any(out.rglob("*.png"))
        if has_outputs and not overwrite:
            raise PredictError(f"--output_dir {out} holds masks without a {RECORD_FILE} (another tool or an older "
                               "weaktr-predict): choose another folder, or pass --overwrite to redo every image.")  # fmt: skip
        return False
    with open(path, encoding="utf-8") as handle:
        previous = json.load(handle)
    if previous == record:
        return True
    if not overwrite:
        changed = sorted(key for key in set(previous) | set(record) if previous.get(key) != record.get(key))
        raise PredictError(f"--output_dir {out} holds masks of another model or other settings (differs in: "
                           f"{', '.join(changed)}); choose another folder, or pass --overwrite to redo every image.")  # fmt: skip
    return False


def run(argv=None):
    """weaktr-predict's work; returns {"written", "done", "unreadable"}. Usage errors raise `PredictError`."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    images = find_images(args.images, exclude=out)
    predictor = Predictor(args)
    record = {"model_sha256": model_hash(args.model), "kind": "cam" if predictor.is_cam else "segmenter",
              **predictor.settings, "overlays": args.overlays, "save_cams": args.save_cams}  # fmt: skip
    keep = check_record(out, record, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / f"{RECORD_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, out / RECORD_FILE)
    logger.info("settings: %s", {key: value for key, value in record.items() if key in predictor.settings})
    written, done, unreadable = 0, 0, []
    for (path, _), name in zip(tqdm(images, desc="predict", dynamic_ncols=True), output_names(images)):
        targets = [out / f"{name}.png"] + ([out / "overlays" / f"{name}.png"] if args.overlays else [])
        if keep and all(target.exists() for target in targets):
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


def main(argv=None):
    """The `weaktr-predict` command: a usage error prints one line and exits 2. As the command (no `argv`) it returns
    None, so the exit status is 0 on success; called from Python with an argument list it returns `run`'s summary."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    try:
        summary = run(argv)
    except PredictError as error:
        print(f"weaktr-predict: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return None if argv is None else summary


def cli(argv=None):
    """The `weaktr-predict` command: exit 0 on success, 2 with one line on a usage error (see `main`)."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
