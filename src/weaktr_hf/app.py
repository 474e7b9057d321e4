"""A local web page (Gradio) to look at a WeakTr run and to try its models on your own images.

    weaktr-app --run runs/demo                  # a run folder: both models, its images, CAMs, pseudo-labels, numbers
    weaktr-app --model runs/demo/seg --port 7861
    weaktr-app --model user/weaktr-demo-seg     # a Hub id, as a Space does (spaces/app.py)

Tabs:
  Try a model   upload an image: the segmenter's mask over it with a class-colour legend and per-class pixel shares;
                with a step-1 model, its image-level scores, each present class's coarse / fine / cross-attention CAM
                and the pseudo-label at the background threshold of a slider, with and without the dense CRF.
  Inspect run   (--run) the run's numbers (all_results.json, per-class IoU), the selection it made (CAM, threshold,
                epoch) with the rule's scores, and its training and validation images, each with its three CAMs, the
                pseudo-label the run wrote, the segmenter's prediction and the ground truth; sortable worst IoU first.

Inference is weaktr-predict's (`weaktr_hf.predict.Predictor`, `weaktr_hf.inference`), so a mask here is the PNG
`weaktr-predict` writes for the same image and flags. The page binds 127.0.0.1 unless `--host` says otherwise.
Needs the `app` extra: `pip install "weaktr-hf[app]"`.
"""

import argparse
import html
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from .configuration_weaktr import WeakTrConfig
from .crf import crf_available
from .image_processing_weaktr import SIXTEEN_BIT_MODES, load_image_file, pil_image_to_uint8
from .inference import cams_to_labels, generate_cams
from .metrics import confusion_matrix, metrics_from_confusion_matrix
from .predict import CAM_CHOICES, CAM_CRFS, SEGMENTATION_CRFS, Predictor
from .predict import parse_args as predict_args
from .pseudo_labels import SETTINGS_FILE, _refine_with_crf, pseudo_label_path
from .visualization import PALETTE, load_label_png, overlay_cam, overlay_mask, upscale

CAM_TITLES = {"coarse_cam": "coarse CAM", "fine_cam": "fine CAM", "cross_attention": "cross-attention CAM"}
# An upload larger than this is refused before it is decoded: sliding-window inference of a 40-megapixel photo takes
# minutes on a CPU, and PIL's own decompression-bomb guard only starts at 89 megapixels.
MAX_IMAGE_PIXELS = 40_000_000
# The listeners that write the pseudo-label panels share this Gradio concurrency group (one event at a time, in order).
PANELS_QUEUE = "pseudo-label-panels"
MIN_PANEL_SIDE = 256  # px: small images (the demo's 64 px) are enlarged by nearest neighbour to stay readable


class UploadError(ValueError):
    """An upload the app cannot use; the message says what is wrong and what to upload instead."""


def read_upload(path, max_pixels=MAX_IMAGE_PIXELS):
    """Open an uploaded file as weaktr-predict opens an image file (EXIF orientation applied, mode kept).

    Returns `(image, notes)`: notes say how an unusual image is converted (16-bit scaled to 8 bits, CMYK to RGB,
    transparency on white), exactly as the model's input is. Raises `UploadError` for a file that is not an image,
    an image over `max_pixels`, or one whose pixels cannot be converted to RGB.
    """
    name = os.path.basename(str(path))
    try:
        with PIL.Image.open(path) as probe:  # reads the header only: the size is known before decoding
            width, height = probe.size
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        # PIL's "cannot identify image file" names the server's temporary copy: the file's own name says more.
        detail = "" if isinstance(error, PIL.UnidentifiedImageError) else f" ({error})"
        raise UploadError(f"{name} is not an image this app can read{detail}; upload a PNG, JPEG, WebP or TIFF "
                          "file.") from None  # fmt: skip
    if width * height > max_pixels:
        raise UploadError(f"{name} is {width} x {height} = {width * height / 1e6:.1f} megapixels, over this page's "
                          f"limit of {max_pixels / 1e6:g}; downscale it first (the models work at a few hundred "
                          "pixels), or start weaktr-app with a larger --max_image_pixels.")  # fmt: skip
    try:
        image = load_image_file(str(path))
        pil_image_to_uint8(image)  # the conversion every model input goes through: fail here, with the file named
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise UploadError(f"{name} cannot be used: {error}. Save it as an 8-bit RGB PNG or JPEG and upload that.") \
            from None  # fmt: skip
    notes = []
    if image.mode in SIXTEEN_BIT_MODES:
        notes.append(f"{image.mode!r} (16-bit) image: scaled to 8 bits (65535 -> 255) as the model's input is.")
    elif image.mode == "CMYK":
        notes.append("CMYK image: converted to RGB by PIL (no colour profile), as the model's input is.")
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        notes.append("transparent image: composited on white, as the model's input is.")
    return image, notes


def class_shares(label_map, names):
    """`[(label, name, share of the pixels)]` of the labels present in `label_map`, largest share first."""
    counts = np.bincount(np.asarray(label_map, dtype=np.int64).ravel(), minlength=len(names))
    total = max(1, int(counts.sum()))
    rows = [(label, names[label] if label < len(names) else str(label), counts[label] / total)
            for label in np.flatnonzero(counts)]  # fmt: skip
    return sorted(rows, key=lambda row: -row[2])


def legend_html(label_map, names):
    """A class-colour legend of the labels in `label_map` (the mask's palette colours) with each one's pixel share."""
    rows = []
    for label, name, share in class_shares(label_map, names):
        red, green, blue = (int(c) for c in PALETTE[label])
        rows.append(f'<tr><td><span class="weaktr-swatch" style="background:rgb({red},{green},{blue})"></span></td>'
                    f"<td>{html.escape(str(name))}</td><td style='text-align:right'>{100 * share:.1f}%</td></tr>")
    return ('<table class="weaktr-legend"><tr><th></th><th>class</th><th>pixels</th></tr>' + "".join(rows)
            + "</table>")  # fmt: skip


def _panel(image):
    return upscale(image, MIN_PANEL_SIDE)


# ---------------------------------------------------------------------------------------------------------------------
# Models: weaktr-predict's Predictor, with the step-1 model's three CAMs kept for the threshold slider
# ---------------------------------------------------------------------------------------------------------------------


def load_predictor(model, scales=(1.0,), flip=False, crf=None, cam="fine_cam", cam_threshold=0.43, device=None,
                   class_threshold=0.5):
    """weaktr-predict's `Predictor` for `model` (a folder or Hub id) with the same flags and defaults as its CLI."""
    argv = ["--model", str(model), "--images", "-", "--output_dir", "-", "--cam", cam,
            "--cam_threshold", str(cam_threshold), "--class_threshold", str(class_threshold),
            "--scales", *map(str, scales)]  # fmt: skip
    argv += (["--flip"] if flip else []) + (["--crf", crf] if crf else []) + (["--device", device] if device else [])
    return Predictor(predict_args(argv))


@dataclass
class CamResult:
    """One image through a step-1 model: its pixels, each class's sigmoid score, the present classes (ids of the
    model's `id2label`) and, per CAM name, the (num_labels, height, width) CAMs normalised per present class."""

    pixels: np.ndarray
    scores: np.ndarray
    present: list
    cams: dict = field(default_factory=dict)


def cam_result(predictor, image, present=None, class_threshold=None):
    """Scores and all three CAMs of `image`, computed as `Predictor.__call__` computes the one CAM it writes: the
    classifier at the model's input size, `generate_cams` at the image's size with the predictor's scales and flip.
    The classes scoring at least `class_threshold` (default: the predictor's) are present; `present` (class ids)
    replaces that choice, e.g. with a dataset image's own labels."""
    args = predictor.args
    with torch.no_grad():
        resized = predictor.classify(image, return_tensors="pt").pixel_values.to(args.device)
        scores = predictor.model(pixel_values=resized).logits.float().sigmoid()[0]
    if present is None:
        level = args.class_threshold if class_threshold is None else class_threshold
        present = [int(i) for i in torch.nonzero(scores >= level).flatten()]
    pixel_values = predictor.native(image, return_tensors="pt").pixel_values.to(args.device)
    cams = generate_cams(predictor.model, pixel_values, [present], scales=args.scales, flip=args.flip, cam=CAM_CHOICES)
    return CamResult(pil_image_to_uint8(image), scores.cpu().numpy(), list(present),
                     {name: maps[0].cpu().numpy() for name, maps in cams.items()})  # fmt: skip


def cam_pseudo_label(result, cam, threshold, crf=None):
    """The pseudo-label map of a `CamResult` (0 background, k + 1 class k): `cams_to_labels` at `threshold` on the
    `cam` maps, refined with the dense CRF settings `crf` (a dict, e.g. `predict.CAM_CRFS['voc12']`) if given."""
    label_map = cams_to_labels(torch.from_numpy(result.cams[cam])[None], [result.present], threshold)[0].numpy()
    if crf is not None and result.present:
        label_map = _refine_with_crf(result.pixels, label_map, result.present, crf)
    return label_map




# ---------------------------------------------------------------------------------------------------------------------
# A run folder: its numbers, its selection, its images with the outputs it wrote
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def results_rows(results):
    """all_results.json as `[[key, value]]` rows (numbers rounded, mIoU-like fractions in %), nested dicts left out."""
    rows = []
    for key, value in sorted(results.items()):
        if isinstance(value, dict):
            continue
        if isinstance(value, float) and ("miou" in key or "accuracy" in key) and 0.0 <= value <= 1.0:
            value = f"{100 * value:.1f} %"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append([key, str(value)])
    return rows


def selection_markdown(results, selection):
    """What the run chose and by which rule: step-1 epoch, the pseudo-label CAM and threshold, with their scores."""
    lines = []
    epoch = results.get("cam_best_epoch", selection.get("epoch"))
    rule = results.get("cam_selection_rule")
    if epoch is not None:
        score = results.get("cam_selection_miou", selection.get("miou"))
        score = f", score {score:.4f}" if isinstance(score, float) else ""
        lines.append(f"- **step-1 epoch**: {epoch}" + (f" (rule `{rule}`{score})" if rule else ""))
    cam, threshold = results.get("pseudo_label_cam", selection.get("cam")), results.get("pseudo_label_threshold")
    if cam is not None:
        rule = results.get("pseudo_label_choice_rule")
        threshold = selection.get("threshold") if threshold is None else threshold
        lines.append(f"- **pseudo-label CAM**: `{cam}` at background threshold {threshold}"
                     + (f" (rule `{rule}`)" if rule else ""))  # fmt: skip
    for name in CAM_CHOICES:
        if f"{name}_miou" in results:
            at = results.get(f"{name}_threshold")
            lines.append(f"- {CAM_TITLES[name]}: {100 * results[name + '_miou']:.1f} % mIoU"
                         + (f" at threshold {at}" if at is not None else ""))  # fmt: skip
    return "\n".join(lines) or "This run has made no selection yet (no all_results.json or cam_selection.json)."


def selection_rows(selection):
    """cam_selection.json's score per swept threshold as `[[threshold, score]]` rows."""
    return [[str(threshold), f"{score:.4f}"] for threshold, score in selection.get("per_threshold", {}).items()]


def per_class_rows(results):
    """The segmenter's per-class validation IoU of all_results.json as `[[class, IoU %]]` rows, with its IoU against
    its own training pseudo-labels (fit) as a third column when the run scored it."""
    fit = results.get("seg_train_fit_per_class_iou") or {}
    return [[name, f"{100 * iou:.1f}"] + ([f"{100 * fit[name]:.1f}"] if name in fit else [])
            for name, iou in results.get("seg_val_per_class_iou", {}).items()]


def _recipe():
    """The training recipe's `parse_args` and `load_data`: they know how a run's command line maps to its dataset
    (presets, the synthetic set's size and seed, held-out validation splits)."""
    from .stages import load_data
    from .train import parse_args

    return parse_args, load_data


def run_dataset(run_dir):
    """The run's dataset (a `DatasetDict`) and its train / validation split names, rebuilt from the command in its
    all_results.json with the recipe's own argument parser and loader."""
    command = _read_json(os.path.join(run_dir, "all_results.json")).get("command")
    if not command:
        raise ValueError(f"{run_dir} has no all_results.json with the run's command, so its dataset is unknown; "
                         "pass a run folder that weaktr-train (examples/train.py) has written.")  # fmt: skip
    tokens = shlex.split(command)
    start = next((i + 1 for i, token in enumerate(tokens) if token.endswith(("train.py", "weaktr-train"))), 0)
    parse_args, load_data = _recipe()
    args = parse_args(tokens[start:])
    dataset = load_data(args)
    return dataset, args.train_split, args.val_split


def per_image_iou(prediction, mask, num_labels):
    """mIoU of one label map against its ground truth (classes in neither are left out), or None without a mask."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if prediction.shape != mask.shape:
        return None
    return metrics_from_confusion_matrix(confusion_matrix(prediction, mask, num_labels))["mean_iou"]


class Run:
    """A run folder as the recipe writes it: cam/, seg/, pseudo_labels/, pseudo_labels_nocrf/, predictions/,
    all_results.json, cam_selection.json; the dataset is rebuilt on first use."""

    def __init__(self, run_dir):
        self.dir = os.fspath(run_dir)
        if not os.path.isdir(self.dir):
            raise FileNotFoundError(f"--run {self.dir} is not a folder; pass the --output_dir of a training run.")
        self.results = _read_json(os.path.join(self.dir, "all_results.json"))
        self.selection = _read_json(os.path.join(self.dir, "cam_selection.json"))
        self.pseudo_settings = _read_json(os.path.join(self.dir, "pseudo_labels", SETTINGS_FILE))
        self._dataset = None
        self._ious = {}

    def model_dir(self, stage):
        path = os.path.join(self.dir, stage)
        return path if os.path.isfile(os.path.join(path, "config.json")) else None

    @property
    def cam(self):
        """The pseudo-label CAM the run chose (falls back to the paper's fine CAM)."""
        return self.results.get("pseudo_label_cam") or self.selection.get("cam") or "fine_cam"

    @property
    def threshold(self):
        """The background threshold the run chose (falls back to the paper's 0.43)."""
        value = self.results.get("pseudo_label_threshold", self.selection.get("threshold"))
        return float(value) if value is not None else 0.43

    def dataset(self):
        if self._dataset is None:
            self._dataset = run_dataset(self.dir)
        return self._dataset

    def split(self, which):
        """The rows of the training (`"train"`) or validation (`"val"`) split."""
        dataset, train, val = self.dataset()
        return dataset[train if which == "train" else val]

    def written(self, which, sample_id):
        """The label maps the run wrote for one image: `{title: map}` (pseudo-labels for train, prediction for val)."""
        folders = ((("pseudo-label (CRF)", "pseudo_labels"), ("pseudo-label (no CRF)", "pseudo_labels_nocrf"))
                   if which == "train" else (("prediction", "predictions"),))  # fmt: skip
        maps = {}
        for title, folder in folders:
            path = pseudo_label_path(os.path.join(self.dir, folder), sample_id)
            if os.path.isfile(path):
                maps[title] = load_label_png(path)
        return maps

    def image_table(self, which, num_labels, progress=None):
        """`[[index, id, labels, IoU]]` of a split; IoU of the run's pseudo-label (train) or prediction (val)
        against the ground truth where both exist (else None). Computed once per split."""
        if which not in self._ious:
            rows = self.split(which)
            rows = rows.select_columns([name for name in ("id", "labels", "semantic_mask") if name in rows.column_names])
            names = self.class_names()
            table = []
            indices = range(len(rows))
            for index in progress.tqdm(indices, desc=f"scoring {which} images") if progress else indices:
                row = rows[index]
                written = self.written(which, row["id"])
                label_map = next(iter(written.values()), None)
                mask = row.get("semantic_mask")
                iou = per_image_iou(label_map, mask, num_labels) if label_map is not None else None
                labels = ", ".join(names[label + 1] for label in row["labels"])
                table.append([index, str(row["id"]), labels, iou])
            self._ious[which] = table
        return self._ious[which]

    def class_names(self):
        """Background first, then the dataset's classes (label k + 1 = class k)."""
        from .data import get_class_names

        dataset, train, _ = self.dataset()
        return ["background", *get_class_names(dataset[train])]


def sort_table(table, worst_first):
    """Rows of `Run.image_table`, in dataset order or by IoU ascending (images without an IoU last)."""
    if not worst_first:
        return sorted(table, key=lambda row: row[0])
    return sorted(table, key=lambda row: (row[3] is None, row[3] if row[3] is not None else 0.0, row[0]))


def table_for_display(table):
    return [[index, sample_id, labels, "" if iou is None else f"{100 * iou:.1f}"] for index, sample_id, labels, iou
            in table]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------

CSS = """
.weaktr-legend td, .weaktr-legend th { padding: 2px 8px; }
.weaktr-swatch { display: inline-block; width: 16px; height: 16px; border: 1px solid #000; vertical-align: middle; }
"""


class App:
    """The models and run behind the page, and the functions its events call (testable without a browser)."""

    def __init__(self, models=(), run=None, scales=(1.0,), flip=False, crf=None, device=None, max_pixels=None,
                 class_threshold=0.5):
        self.run = Run(run) if run else None
        models = list(models)
        if self.run is not None:
            models = [path for path in (self.run.model_dir("seg"), self.run.model_dir("cam")) if path] + models
            if not models:
                raise FileNotFoundError(f"--run {run} holds neither seg/ nor cam/ with a config.json; pass the "
                                        "--output_dir of a run whose step 1 has finished.")  # fmt: skip
        if not models:
            raise ValueError("give a model (--model FOLDER_OR_HUB_ID) or a run (--run DIR).")
        self.segmenter = self.cam_model = None
        self.max_pixels = max_pixels or MAX_IMAGE_PIXELS
        cam = self.run.cam if self.run else "fine_cam"
        threshold = self.run.threshold if self.run else 0.43
        for model in models:
            config = WeakTrConfig.from_pretrained(model)
            is_cam = "WeakTrForCAM" in (config.architectures or [])
            predictor = load_predictor(model, scales, flip, crf if not is_cam else None, cam, threshold, device,
                                       class_threshold)
            if is_cam:
                self.cam_model = self.cam_model or predictor
            else:
                self.segmenter = self.segmenter or predictor
        self.crf_name = crf
        self.inspect_predictor = None
        if self.cam_model is not None and self.run is not None and self.run.pseudo_settings:
            # The run's images get the CAMs its pseudo-label stage made: its scales and flip.
            settings = self.run.pseudo_settings
            self.inspect_predictor = load_predictor(self.cam_model.args.model, settings.get("scales", [1.0]),
                                                    settings.get("flip", False), None, cam, threshold, device,
                                                    class_threshold)
        else:
            self.inspect_predictor = self.cam_model

    # -- Try a model ---------------------------------------------------------------------------------------------

    def segment_image(self, image):
        """The segmenter's label map of a PIL image, as weaktr-predict writes it, and the names of its labels."""
        label_map, _ = self.segmenter(image)
        names = [self.segmenter.class_name(label) for label in range(len(self.segmenter.id2label))]
        return np.asarray(label_map, dtype=np.uint8), names

    def cam_names(self):
        """Background first, then the step-1 model's classes: the names of a pseudo-label map's labels."""
        id2label = self.cam_model.id2label
        return ["background", *(id2label[i] for i in range(len(id2label)))]

    def cam_gallery(self, result, names):
        """`[(image, caption)]`: each present class's three CAMs over the image."""
        items = []
        for class_id in result.present:
            for name in ("coarse_cam", "fine_cam", "cross_attention"):
                overlay = overlay_cam(result.pixels, result.cams[name][class_id])
                items.append((_panel(overlay), f"{names[class_id + 1]}: {CAM_TITLES[name]}"))
        return items

    def scores_rows(self, result, names):
        """`[[class, score, present]]`, best first: the classes scoring at least 0.05 and every present one."""
        return [[names[i + 1], f"{score:.3f}", "yes" if i in result.present else ""]
                for i, score in sorted(enumerate(result.scores), key=lambda item: -item[1])
                if score >= 0.05 or i in result.present]  # fmt: skip

    def cam_note(self, result, names, class_threshold):
        """One line on the classes the step-1 model finds, or what to do when it finds none."""
        if not result.present:
            best = int(np.argmax(result.scores))
            return (f"No class scores {class_threshold:.2f} or more (best: {names[best + 1]}, "
                    f"{result.scores[best]:.3f}): the pseudo-label is all background. Lower the class score "
                    "threshold to see CAMs.")  # fmt: skip
        return "Present: " + ", ".join(f"{names[i + 1]} ({result.scores[i]:.2f})" for i in result.present) + "."

    def pseudo_label_views(self, result, cam, threshold, with_crf):
        """The pseudo-label over the image without and, if asked, with the dense CRF (else None), the legend of the
        last of them and its label map."""
        plain = cam_pseudo_label(result, cam, threshold)
        shown, refined_view = plain, None
        if with_crf:
            shown = cam_pseudo_label(result, cam, threshold, CAM_CRFS[self.crf_name or "voc12"])
            refined_view = _panel(overlay_mask(result.pixels, shown))
        return _panel(overlay_mask(result.pixels, plain)), refined_view, legend_html(shown, self.cam_names()), shown

    # -- Inspect a run -------------------------------------------------------------------------------------------

    def inspect_image(self, which, index):
        """Panels of one dataset image: the image, its three CAMs for each labelled class, what the run wrote for it
        and the ground truth. Returns `([(image, caption)], markdown)`."""
        rows = self.run.split(which)
        if not 0 <= index < len(rows):
            raise IndexError(f"image {index} is outside this split's 0..{len(rows) - 1}.")
        row = rows[index]
        image = row["image"]
        names = self.run.class_names()
        pixels = pil_image_to_uint8(image)
        panels = [(_panel(PIL.Image.fromarray(pixels)), f"{row['id']}")]
        if self.inspect_predictor is not None and row["labels"]:
            result = cam_result(self.inspect_predictor, image, present=list(row["labels"]))
            panels += self.cam_gallery(result, names)
        mask = row.get("semantic_mask")
        num_labels = len(names)
        lines = [f"**{row['id']}** ({which}), labels: {', '.join(names[i + 1] for i in row['labels']) or 'none'}"]
        for title, label_map in self.run.written(which, row["id"]).items():
            panels.append((_panel(overlay_mask(pixels, label_map)), title))
            iou = per_image_iou(label_map, mask, num_labels)
            if iou is not None and not math.isnan(iou):
                lines.append(f"- {title}: {100 * iou:.1f} % mIoU on this image")
        if mask is not None:
            panels.append((_panel(overlay_mask(pixels, np.asarray(mask))), "ground truth"))
        return panels, "\n".join(lines)


def build_app(app):
    """The Gradio Blocks page of an `App`."""
    import gradio as gr

    def read(path):
        if path is None:
            raise gr.Error("Upload an image first.")
        try:
            return read_upload(path, app.max_pixels)
        except UploadError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="WeakTr") as page:
        title = f"run `{app.run.dir}`" if app.run else "model " + ", ".join(
            f"`{p.args.model}`" for p in (app.segmenter, app.cam_model) if p)  # fmt: skip
        gr.Markdown(f"# WeakTr: {title}")
        cam_state = gr.State(None)
        with gr.Tab("Try a model"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image (PNG, JPEG, WebP, TIFF...)", file_types=["image"], type="filepath",
                                     elem_id="upload")  # fmt: skip
                    notes = gr.Markdown(elem_id="notes")
                    if app.cam_model is not None:
                        cam_choice = gr.Radio(list(CAM_CHOICES), value=app.cam_model.args.cam,
                                              label="CAM behind the pseudo-label")  # fmt: skip
                        threshold = gr.Slider(0.0, 1.0, value=app.cam_model.args.cam_threshold, step=0.01,
                                              label="background threshold", elem_id="threshold")  # fmt: skip
                        with_crf = gr.Checkbox(value=False, label="also refine with the dense CRF",
                                               interactive=crf_available(),
                                               info=None if crf_available() else "pydensecrf is not installed")
                        class_level = gr.Slider(0.0, 1.0, value=app.cam_model.args.class_threshold, step=0.01,
                                                label="class score threshold (a class is present from it on)",
                                                elem_id="class-threshold")  # fmt: skip
                with gr.Column(scale=2):
                    if app.segmenter is not None:
                        gr.Markdown("### Segmenter")
                        with gr.Row():
                            seg_image = gr.Image(label="mask over the image", elem_id="seg-overlay", scale=2,
                                                 format="png")
                            seg_legend = gr.HTML(elem_id="seg-legend")
                    if app.cam_model is not None:
                        gr.Markdown("### Step-1 model: image-level scores, CAMs, pseudo-label")
                        cam_notes = gr.Markdown(elem_id="cam-notes")
                        with gr.Row():
                            scores = gr.Dataframe(headers=["class", "score", "present"], label="image-level labels",
                                                  elem_id="scores", scale=1)  # fmt: skip
                            pseudo_legend = gr.HTML(elem_id="pseudo-legend")
                        with gr.Row():
                            pseudo = gr.Image(label="pseudo-label, no CRF", elem_id="pseudo", format="png")
                            pseudo_crf = gr.Image(label="pseudo-label, dense CRF (tick the box)", elem_id="pseudo-crf",
                                                  format="png")  # fmt: skip
                        cams = gr.Gallery(label="CAMs of the present classes", elem_id="cams", columns=3, height=320,
                                          format="png")

            def step1_outputs(image, cam, level, crf, class_threshold):
                """What the step-1 model shows of an image: its CAMs are kept (state) for the threshold slider."""
                result = cam_result(app.cam_model, image, class_threshold=class_threshold)
                names = app.cam_names()
                plain, refined, legend, _ = app.pseudo_label_views(result, cam, level, crf)
                return [result, app.cam_note(result, names, class_threshold), app.scores_rows(result, names), legend,
                        plain, refined, app.cam_gallery(result, names)]  # fmt: skip

            def analyze(path, *controls, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
                try:
                    image, found = read_upload(path, app.max_pixels)
                except UploadError as error:  # said where the answer would be; the upload is cleared for the next
                    return [None, f"**Cannot use this upload.** {error}"] + [None] * (len(outputs) + len(step1) - 1)
                values = [gr.skip(), " ".join(found) or f"{image.width} x {image.height} px, mode {image.mode}"]
                if app.segmenter is not None:
                    progress(0.1, desc="segmenting")
                    label_map, names = app.segment_image(image)
                    values += [_panel(overlay_mask(pil_image_to_uint8(image), label_map)), legend_html(label_map,
                                                                                                        names)]
                if app.cam_model is not None:
                    progress(0.5, desc="computing CAMs")
                    values += step1_outputs(image, *controls)
                return values

            def reclassify(path, *controls, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
                if path is None:
                    return [gr.skip()] * len(step1)
                progress(0.2, desc="computing CAMs")
                return step1_outputs(read(path)[0], *controls)

            def relabel(result, cam, level, crf):
                if result is None:
                    return gr.skip(), gr.skip(), gr.skip()
                plain, refined, legend, _ = app.pseudo_label_views(result, cam, level, crf)
                return legend, plain, refined

            controls, outputs, step1 = [], [notes], []
            if app.segmenter is not None:
                outputs += [seg_image, seg_legend]
            if app.cam_model is not None:
                controls = [cam_choice, threshold, with_crf, class_level]
                step1 = [cam_state, cam_notes, scores, pseudo_legend, pseudo, pseudo_crf, cams]
            # Every listener that writes the pseudo-label panels runs in one queue, one event at a time in the order
            # they came (PANELS_QUEUE): a relabel started after an upload or a class-threshold change then runs after
            # it, on the CAMs it stored, and writes last. In parallel, the older event could finish last and put back
            # panels made with the controls as they were when it started (e.g. an empty CRF panel after the box was
            # ticked).
            one_queue = dict(concurrency_id=PANELS_QUEUE, concurrency_limit=1)
            upload.upload(analyze, [upload, *controls], [upload] + outputs + step1, api_name="analyze",
                          **one_queue)  # fmt: skip
            if app.cam_model is not None:
                # One listener for the three controls, "always_last": of the changes made while one runs, only the
                # last is run next, with the controls as they now are.
                gr.on([threshold.release, cam_choice.change, with_crf.change], relabel,
                      [cam_state, *controls[:3]], [pseudo_legend, pseudo, pseudo_crf], api_name=False,
                      trigger_mode="always_last", **one_queue)  # fmt: skip
                class_level.release(reclassify, [upload, *controls], step1, api_name=False, **one_queue)

            def segment_api(path):
                """Segmenter overlay and per-class pixel shares of an image file (the API of the segmenter alone)."""
                image, _ = read(path)
                label_map, names = app.segment_image(image)
                shares = {name: round(share, 4) for _, name, share in class_shares(label_map, names)}
                return overlay_mask(pil_image_to_uint8(image), label_map), shares

            def cams_api(path, cam, level, crf):
                """Image-level scores, each present class's three CAMs, and the pseudo-label (over the image, and its
                pixel shares) of an image file at background threshold `level`, with the dense CRF if `crf`."""
                image, _ = read(path)
                if cam not in CAM_CHOICES:
                    raise gr.Error(f"cam must be one of {', '.join(CAM_CHOICES)}, got {cam!r}.")
                result = cam_result(app.cam_model, image)
                names = app.cam_names()
                plain, refined, _, label_map = app.pseudo_label_views(result, cam, float(level), bool(crf))
                scores_out = {names[i + 1]: round(float(s), 4) for i, s in enumerate(result.scores)}
                shares = {name: round(share, 4) for _, name, share in class_shares(label_map, names)}
                return scores_out, app.cam_gallery(result, names), plain if refined is None else refined, shares

            with gr.Row(visible=False):  # API-only endpoints: a file in, plain values out
                api_file = gr.File(type="filepath")
                if app.segmenter is not None:
                    api_overlay = gr.Image(label="overlay", format="png")
                    api_shares = gr.JSON(label="pixel shares")
                    api_file.change(segment_api, [api_file], [api_overlay, api_shares], api_name="segment")
                if app.cam_model is not None:
                    api_cam = gr.Textbox(value=app.cam_model.args.cam, label="cam")
                    api_level = gr.Number(value=app.cam_model.args.cam_threshold, label="threshold")
                    api_crf = gr.Checkbox(value=False, label="crf")
                    api_scores, api_cams = gr.JSON(label="scores"), gr.Gallery(label="cams", format="png")
                    api_pseudo = gr.Image(label="pseudo-label", format="png")
                    api_pseudo_shares = gr.JSON(label="shares")
                    api_file.change(cams_api, [api_file, api_cam, api_level, api_crf],
                                    [api_scores, api_cams, api_pseudo, api_pseudo_shares], api_name="cams")

        if app.run is not None:
            build_run_tab(app, gr)
    return page


def build_run_tab(app, gr):
    """The "Inspect run" tab: numbers, selection, and an image browser sorted by per-image IoU."""
    run = app.run
    with gr.Tab("Inspect run"):
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Selection\n" + selection_markdown(run.results, run.selection))
                if run.selection.get("per_threshold"):
                    gr.Dataframe(selection_rows(run.selection), headers=["threshold", "score"],
                                 label=f"step-1 selection score per threshold ({run.selection.get('cam')})")
                if per_class_rows(run.results):
                    rows = per_class_rows(run.results)
                    headers = ["class", "val IoU %", "fit to pseudo-labels %"][: len(rows[0])]
                    gr.Dataframe(rows, headers=headers, label="segmenter per class: validation IoU, and IoU against "
                                 "its own training pseudo-labels (fit)")
            with gr.Column():
                gr.Dataframe(results_rows(run.results), headers=["all_results.json", "value"], label="numbers",
                             max_height=420, elem_id="results", wrap=True)  # fmt: skip
        gr.Markdown("### Images")
        with gr.Row():
            which = gr.Radio([("training (pseudo-labels)", "train"), ("validation (predictions)", "val")],
                             value="val", label="split")  # fmt: skip
            order = gr.Radio([("dataset order", False), ("worst IoU first", True)], value=False, label="order")
            load = gr.Button("List images", elem_id="list-images")
        table_state = gr.State([])
        with gr.Row():
            table = gr.Dataframe(headers=["#", "id", "labels", "IoU %"], label="images (click one)", interactive=False,
                                 max_height=560, elem_id="image-table", scale=2, wrap=True,
                                 column_widths=["10%", "46%", "28%", "16%"])  # fmt: skip
            with gr.Column(scale=3):
                summary = gr.Markdown(elem_id="image-summary")
                panels = gr.Gallery(label="image, CAMs, written labels, ground truth", columns=4, height=560,
                                    elem_id="run-panels", format="png")  # fmt: skip

        def list_images(split, worst_first, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
            progress(0, desc="loading the run's dataset")
            try:
                num_labels = len(run.class_names())
                rows = sort_table(run.image_table(split, num_labels, progress), worst_first)
            except (ValueError, RuntimeError, FileNotFoundError) as error:
                raise gr.Error(str(error)) from None
            return rows, table_for_display(rows)

        def show(split, rows, event: gr.SelectData):
            position = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            if not rows or position >= len(rows):
                return gr.skip(), gr.skip()
            return app.inspect_image(split, rows[position][0])[::-1]

        for trigger in (load.click, which.change, order.change):
            trigger(list_images, [which, order], [table_state, table], api_name=False)
        table.select(show, [which, table_state], [summary, panels], api_name=False)


def space_card_section(space_id):
    """A model card's "Demo" section linking to the Space that serves the model (spaces/app.py), e.g. for a pushed
    model whose Space is `user/weaktr-demo`."""
    parts = str(space_id).split("/")
    if len(parts) != 2 or not all(parts) or any(char.isspace() for char in str(space_id)):
        raise ValueError(f"space_id must be 'owner/name' (a Hugging Face Space), got {space_id!r}.")
    return (f"## Demo\n\nTry the model on your own images in its Space: "
            f"[{space_id}](https://huggingface.co/spaces/{space_id}) (a WeakTr page: "
            "`weaktr-app --model <this model>`).\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="weaktr-app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = parser.add_argument
    add("--run", help="a training run's --output_dir: its models, images, CAMs, pseudo-labels and numbers")
    add("--model", action="append", default=[],
        help="a trained model folder (seg/ or cam/ of a run) or a Hub id; may be given twice (segmenter and CAM model)")
    add("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves every network interface: only on "
        "a network you trust)")  # fmt: skip
    add("--port", type=int, default=7860)
    add("--scales", type=float, nargs="+", default=[1.0], help="as weaktr-predict's --scales")
    add("--flip", action="store_true", help="as weaktr-predict's --flip")
    add("--crf", choices=sorted(SEGMENTATION_CRFS), help="as weaktr-predict's --crf (the segmenter's mask)")
    add("--class_threshold", type=float, default=0.5, help="as weaktr-predict's --class_threshold (step-1 model)")
    add("--device", help="as weaktr-predict's --device (default: cuda if available)")
    add("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS, help="largest upload, in pixels")
    add("--share", action="store_true", help="also open a public gradio.live link (Gradio's tunnel)")
    args = parser.parse_args(argv)
    if not args.run and not args.model:
        parser.error("give --run DIR (a training run) or --model FOLDER_OR_HUB_ID.")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('weaktr-app needs Gradio: pip install "weaktr-hf[app]"')
    app = App(args.model, run=args.run, scales=args.scales, flip=args.flip, crf=args.crf, device=args.device,
              max_pixels=args.max_image_pixels, class_threshold=args.class_threshold)  # fmt: skip
    page = build_app(app)
    page.queue().launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                        max_file_size="200mb", show_error=True)  # fmt: skip


if __name__ == "__main__":
    main()
