"""Image processor for both WeakTr models: preprocessing of images (and optional segmentation maps) and the
post-processing of model outputs into label maps.

Preprocessing is resize -> rescale (1/255) -> ImageNet normalisation, after converting any PIL mode to RGB (16-bit
and float images are scaled to the 8-bit range rather than clipped). With `do_pad=True` images are zero-padded at the
bottom/right to a multiple of `size_divisor` (the model's patch size), so the model never pads.

Post-processing maps patch-resolution outputs back to the original images. Pass `target_sizes` = the ORIGINAL image
sizes: the processor recomputes each image's resized size from it, crops the bottom/right padding that the logits
cover (its own `do_pad` padding, or the model's padding to a multiple of the patch size), then resizes to the target.

`normalize_cams` and `cams_to_label_map` are the CAM -> pseudo-label steps of WeakTr's CAM generation (paper Sec. 3.1;
hustvl/WeakTr `engine.py` and `evaluation.py`), kept as pure functions so the multi-scale CAM generator shares them.
"""

import io
import json
import logging
import os
import urllib.request
import warnings
from types import SimpleNamespace

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature, get_size_dict
from transformers.image_transforms import get_size_with_aspect_ratio, group_images_by_shape, reorder_images
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import cached_file

from .labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Image statistics (mean, std) of the authors' recipes by the name their configs use (segm/data/utils.py STATS):
# "deit" ImageNet (DeiT-S, DINOv2-S), "vit" 0.5 (the augreg ViT-S), "eva02" OpenAI CLIP (EVA-02-S).
IMAGE_STATISTICS = {
    "deit": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "eva02": (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)),
}

# PIL modes holding 16-bit intensities (PNG 16-bit grey opens as "I;16", older Pillow gives "I").
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
CAM_OUTPUT_NAMES = ("fine_cam", "coarse_cam", "cross_attention")
SIXTEEN_BIT_TO_EIGHT_BIT = 255.0 / 65535.0


def load_image_file(path_or_url: str, timeout: float | None = None) -> PIL.Image.Image:
    """Open an image file path or http(s) URL with PIL, as displayed (EXIF orientation applied), keeping its mode.

    The one opener of files and URLs (16-bit, alpha and palette images stay as they are, so `pil_image_to_array`
    converts them the same way whatever their source).
    """
    if path_or_url.startswith(("http://", "https://")):
        with urllib.request.urlopen(path_or_url, timeout=timeout) as response:  # raises on HTTP errors
            source = io.BytesIO(response.read())
    else:
        source = path_or_url
    with PIL.Image.open(source) as opened:
        opened.load()
        return PIL.ImageOps.exif_transpose(opened)


def pil_image_to_array(image: PIL.Image.Image, convert_rgb: bool = True) -> np.ndarray:
    """Convert a PIL image of any common mode to an (H, W, 3) array in the 8-bit range [0, 255].

    The one image conversion of the project: the processor, the training and evaluation transforms, pseudo-labels and
    the CRF all go through it (the last three via `pil_image_to_uint8`), so every step sees the same pixels.

    8-bit modes keep dtype uint8; 16-bit ("I;16", "I") and float ("F", intensities in [0, 1]) images become float32
    scaled to [0, 255] so 65535 -> 255.0 instead of being clipped to white (a mode "I" image holding 8-bit values is
    read as 16-bit too, i.e. nearly black, with a warning: convert it to "L" first). Transparency is composited on
    white. With `convert_rgb=False` the channels are kept as they are (only the bit depth is scaled).

    The image is used in the orientation it has: an image opened by the caller that still carries an EXIF orientation
    tag is not rotated (as in transformers' processors), with a warning, since datasets and file paths are used as
    displayed.
    """
    mode = image.mode
    orientation = image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) if hasattr(image, "getexif") else 1
    if orientation not in (None, 1):
        warnings.warn(
            f"the image carries EXIF orientation {orientation} and is used as stored, not as displayed; datasets and "
            "file paths are used as displayed: pass PIL.ImageOps.exif_transpose(image) (or the file path) instead",
            stacklevel=2,
        )
    if mode == "La":  # premultiplied alpha: PIL converts it to nothing else than "LA"
        image, mode = image.convert("LA"), "LA"
    if mode in SIXTEEN_BIT_MODES:
        array = np.clip(np.asarray(image).astype(np.float32), 0, 65535)
        if mode == "I" and array.size and array.max() <= 255:
            warnings.warn(
                "a mode 'I' image with values in 0..255 is read as 16-bit (0..65535), so it comes out nearly black; "
                "if it holds 8-bit values, pass image.convert('L') or an 8-bit image instead",
                stacklevel=2,
            )
        array = array * np.float32(SIXTEEN_BIT_TO_EIGHT_BIT)
    elif mode == "F":
        array = np.asarray(image).astype(np.float32)
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(
                f"mode 'F' image has values in [{array.min():g}, {array.max():g}]; float images must hold "
                "intensities in [0, 1]: rescale it, or convert it to 'L' or 'RGB' yourself"
            )
        array = array * np.float32(255.0)
    elif not convert_rgb:
        return np.asarray(image.convert("L") if mode == "1" else image)
    else:
        has_alpha = mode in ALPHA_MODES or "transparency" in image.info
        try:
            converted = image.convert("RGBA" if has_alpha else "RGB")
        except (ValueError, OSError) as error:
            raise ValueError(
                f"mode {mode!r} cannot be converted to RGB ({error}); convert the image to 'RGB' first"
            ) from None
        array = np.asarray(converted)
        if has_alpha:
            rgba = array.astype(np.float32)
            alpha = rgba[..., 3:] / 255.0
            array = np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return array
    if convert_rgb:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def pil_image_to_uint8(image: PIL.Image.Image) -> np.ndarray:
    """`pil_image_to_array` rounded to 8 bits: a writable, C-contiguous uint8 (H, W, 3) RGB array.

    What the training augmentations (which work on 8-bit images) and the CRF take; it differs from the processor's
    float values of 16-bit and float images by at most half an 8-bit level.
    """
    array = pil_image_to_array(image, convert_rgb=True)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array), 0, 255)
    return np.array(array, dtype=np.uint8, order="C", copy=True)


def reduce_labels(label_map: torch.Tensor) -> torch.Tensor:
    """SegFormer-style label reduction: 0 (background) becomes 255 (ignored), other classes shift down by one."""
    ignore = torch.full_like(label_map, IGNORE_INDEX)
    return torch.where((label_map == 0) | (label_map == IGNORE_INDEX), ignore, label_map - 1)


def normalize_cams(cams: torch.Tensor, present: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each present class's CAM to [0, 1] and zero the absent ones.

    `cams` is (..., C, H, W) and `present` a boolean or multi-hot (..., C) of the image-level labels. The division
    uses `max - min + eps`, as the authors' CAM generation does, so a flat map becomes all zeros.
    """
    present = present.to(device=cams.device, dtype=torch.bool)
    flat = cams.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    normalized = ((flat - low) / (high - low + eps)).view_as(cams)
    return normalized * present[..., None, None]


def cams_to_label_map(cams: torch.Tensor, present: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pseudo-label map from normalised CAMs: argmax over [threshold, CAMs of present classes].

    `cams` is (..., C, H, W) in [0, 1], `present` a boolean or multi-hot (..., C). Returns int64 (..., H, W) with
    0 = background and k + 1 = foreground class k. Absent classes never win, ties go to background.
    """
    present = present.to(device=cams.device, dtype=torch.bool)
    scores = cams.masked_fill(~present[..., None, None], float("-inf"))
    background = torch.full_like(cams[..., :1, :, :], threshold)
    return torch.cat([background, scores], dim=-3).argmax(dim=-3)


# The authors' evaluation caps the long side at 8 x the short side (img_scale (8 x 520, 520), OnlineRetraining/segm/
# data/base.py:58 with max_ratio 8, data/config/pascal_voc.py:10).
EVAL_MAX_RATIO = 8


def segment_pass_size(size, scale, base_size=None, min_size=None):
    """
    (height, width) of one evaluation pass of an image of `size` (height, width) at `scale`.

    - Without `base_size`: each side is `round(side * scale)`.
    - With `base_size` (the authors' 520): as mmseg's keep-ratio resize to img_scale (8 x base, base) x scale: the
      short side becomes `int(base_size * scale)` (the long side at most 8x that), each side `int(side * f + 0.5)`.
    - With `min_size` (the authors' 480, their window size): a pass whose short side is below it is then resized so
      the short side is `min_size` and the long side `int(long / short * min_size)` (OnlineRetraining/segm/model/
      utils.py:106-118).

    For a 500 x 375 image with base 520, min 480 and scales 0.5 ... 1.75, the short sides are 480, 480, 520, 650,
    780, 910.

    Returns the sizes of the two resizes, `(first, second)`; `second` is None when no upsampling to `min_size` is
    needed.
    """
    height, width = size
    if base_size is None:
        first = (max(1, round(height * scale)), max(1, round(width * scale)))
    else:
        short, long = int(base_size * scale), int(EVAL_MAX_RATIO * base_size * scale)
        factor = min(short / min(height, width), long / max(height, width))
        first = (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
    second = None
    if min_size is not None and min(first) < min_size:
        h, w = first
        second = (min_size, int(w / h * min_size)) if h < w else (int(h / w * min_size), min_size)
    return first, second


def window_starts(length, window, stride):
    """Top (or left) offsets of the windows along one side: every `stride`, the last one flush with the border."""
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


def window_boxes(size, window_size, window_stride):
    """(top, left, height, width) of the sliding windows over an image of `size` (height, width), row by row.

    Windows are `window_size` squares, clipped to the image on a side shorter than the window; without a
    `window_size` the image is one window.
    """
    height, width = size
    if not window_size:
        return [(0, 0, height, width)]
    crop = (min(window_size, height), min(window_size, width))
    return [
        (top, left, *crop)
        for top in window_starts(height, window_size, window_stride)
        for left in window_starts(width, window_size, window_stride)
    ]


def resolved_window_stride(window_size, window_stride=None):
    """The window step: as given, else 2/3 of the window (the authors' 480 / 320), at least 1 pixel."""
    if not window_size or window_stride:
        return window_stride
    return max(1, round(window_size * 2 / 3))


def check_evaluation_geometry(base_size=None, min_size=None, window_size=None, window_stride=None):
    """Each setting is None or a positive int, and the windows leave no pixel uncovered."""
    for name, value in (("base_size", base_size), ("min_size", min_size), ("window_size", window_size),
                        ("window_stride", window_stride)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer (pixels), got {value!r}")
    if window_stride is not None and window_size is None:
        raise ValueError(f"window_stride {window_stride} needs a window_size; set both, or neither")
    stride = resolved_window_stride(window_size, window_stride)
    if window_size is not None and stride > window_size:
        raise ValueError(
            f"window_stride ({stride}) is larger than window_size ({window_size}), which would leave pixels that no "
            "window covers; use a stride at most the window size"
        )


def evaluation_pass_sizes(size, geometry):
    """The sizes an image of `size` (height, width) is resized to, in order, by the single-scale evaluation geometry
    (`segment_pass_size` at scale 1.0; nothing without `do_resize`)."""
    if not geometry.do_resize:
        return []
    return [pass_size for pass_size in segment_pass_size(size, 1.0, geometry.base_size, geometry.min_size) if pass_size]


def evaluation_size(size, geometry):
    """(height, width) of an image of `size` after the evaluation geometry's resizes (before the windows)."""
    sizes = evaluation_pass_sizes(size, geometry)
    return sizes[-1] if sizes else tuple(size)


class WeakTrImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Map segmentation-map label 0 to 255 (ignored) and shift the others down by one, as SegFormer does.
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        The model's patch size: `do_pad` pads to a multiple of it, and post-processing uses it to map one output
        cell to `size_divisor` pixels.
    base_size (`int`, *optional*, defaults to `self.base_size`):
        Evaluation geometry: resize keeping the aspect ratio so the short side is `base_size` (the long side at
        most 8x that), as the training script's eval stage (`segment_pass_size`); `size` is then not used.
    min_size (`int`, *optional*, defaults to `self.min_size`):
        Evaluation geometry: then upsample an image whose short side is below `min_size`.
    window_size (`int`, *optional*, defaults to `self.window_size`):
        Evaluation geometry: cut each (resized) image into `window_size` squares every `window_stride` pixels (the
        last one flush with the border); `pixel_values` holds the windows of all images in order, and
        post-processing with `target_sizes` stitches them back.
    window_stride (`int`, *optional*, defaults to `self.window_stride`):
        Step between windows (default: 2/3 of `window_size`, rounded).
    """

    do_reduce_labels: bool
    size_divisor: int
    base_size: int
    min_size: int
    window_size: int
    window_stride: int


class WeakTrImageProcessor(TorchvisionBackend):
    r"""
    Image processor of [`WeakTrForCAM`] and [`WeakTrForSemanticSegmentation`] (torchvision backend).

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize images (and segmentation maps) to `size`.
        size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`):
            `{"height", "width"}` for a fixed size, or `{"shortest_edge"}` (optionally with `"longest_edge"`) to keep
            the aspect ratio. Step-1 models use 224; step-2 processors are saved with 480.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`):
            Image resampling filter; segmentation maps always use nearest.
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, defaults to `1/255`):
            Scale 8-bit intensities to [0, 1]. 16-bit and float PIL images are first brought to the 8-bit range.
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean / image_std (ImageNet defaults):
            Normalise each channel.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Convert L / LA / P / RGBA / CMYK / 16-bit / float inputs to 3-channel RGB (alpha composited on white).
        do_pad (`bool`, *optional*, defaults to `False`):
            Zero-pad images at the bottom/right to a multiple of `size_divisor` (and at least `pad_size` if given),
            all images of a batch to the same size; segmentation maps are padded with 255 (ignored).
        size_divisor (`int`, *optional*, defaults to 16):
            The model's patch size (see `WeakTrImageProcessorKwargs`).
        do_reduce_labels (`bool`, *optional*, defaults to `False`):
            Reduce segmentation-map labels as SegFormer does (0 -> 255, k -> k - 1).
        base_size, min_size, window_size, window_stride (`int`, *optional*, default `None`):
            The evaluation geometry of `weaktr_hf.inference.segment` at one scale (see `WeakTrImageProcessorKwargs`).
            With any of them set, images are normalised at their own size and then resized bilinearly (no
            antialiasing) to the evaluation size instead of to `size`, and large images become several windows, so
            the pipeline gives the eval stage's single-scale prediction. Segmenters trained or converted by weaktr-hf
            save their processor with them (`evaluation_processor`); without them the processor resizes to `size`.
    """

    valid_kwargs = WeakTrImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_pad = False
    size_divisor = 16
    do_reduce_labels = False
    base_size = None
    min_size = None
    window_size = None
    window_stride = None

    def __init__(self, **kwargs: Unpack[WeakTrImageProcessorKwargs]):
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load as transformers does; a `size_divisor` that disagrees with the patch size of the model saved beside it
        (its `config.json`) is replaced by that patch size, with a warning, since post-processing depends on it.

        `AutoImageProcessor` (and so `pipeline`) goes through this method up to transformers 5.24; from 5.25 it builds
        the processor from its saved settings alone (`from_dict`), so there a disagreeing folder is not fixed up and
        post-processing raises an error that names it. `save_pretrained` never writes such a folder.
        """
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if "size_divisor" in kwargs:
            return processor
        names = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
        lookup = {name: kwargs[name] for name in names if name in kwargs}
        config_file = cached_file(
            pretrained_model_name_or_path,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **lookup,
        )
        if config_file is None:
            return processor
        with open(config_file, encoding="utf-8") as file:
            patch_size = json.load(file).get("patch_size")
        if isinstance(patch_size, int) and patch_size != processor.size_divisor:
            logger.warning(
                "the processor saved in %s has size_divisor %d but the model saved with it has patch_size %d; using "
                "size_divisor=%d (post-processing maps each output cell to size_divisor pixels). Save the processor "
                "again to silence this.",
                pretrained_model_name_or_path, processor.size_divisor, patch_size, patch_size,
            )  # fmt: skip
            processor.size_divisor = patch_size
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does; saved after its model (whose `config.json` is already there), the processor is
        also made loadable where weaktr-hf is not installed (`AutoImageProcessor` / `pipeline` with
        `trust_remote_code=True`).

        Its code goes into the folder and the model's `config.json` names it (`auto_map["AutoImageProcessor"]`);
        `preprocessor_config.json` keeps no class name, so transformers finds the processor through the config. An
        `auto_map` in `preprocessor_config.json` itself would make transformers derive a video processor from it and
        ask to run remote code even with the package installed.

        Saved beside a model whose patch size differs from `size_divisor`, the file gets the patch size (with a
        warning; this processor is left as it is), since post-processing maps each output cell to `size_divisor`
        pixels.
        """
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(save_directory, "config.json")
        if not os.path.isfile(config_file):
            return saved
        with open(config_file, encoding="utf-8") as file:
            config = json.load(file)
        if config.get("model_type") != "weaktr":
            return saved
        custom_object_save(self, save_directory)  # this file and the files it imports
        auto_map = config.setdefault("auto_map", {})
        auto_map["AutoImageProcessor"] = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        with open(config_file, "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, sort_keys=True)
            file.write("\n")
        processor_file = os.path.join(save_directory, "preprocessor_config.json")
        with open(processor_file, encoding="utf-8") as file:
            processor_config = json.load(file)
        processor_config.pop("image_processor_type", None)
        patch_size = config.get("patch_size")
        if isinstance(patch_size, int) and processor_config.get("size_divisor") != patch_size:
            logger.warning(
                "saving a processor with size_divisor %s beside a model with patch_size %d in %s; its "
                "preprocessor_config.json gets size_divisor=%d (post-processing maps each output cell to size_divisor "
                "pixels).",
                processor_config.get("size_divisor"), patch_size, save_directory, patch_size,
            )  # fmt: skip
            processor_config["size_divisor"] = patch_size
        with open(processor_file, "w", encoding="utf-8") as file:
            json.dump(processor_config, file, indent=2, sort_keys=True)
            file.write("\n")
        return saved

    def preprocess(self, images, segmentation_maps=None, **kwargs: Unpack[WeakTrImageProcessorKwargs]) -> BatchFeature:
        r"""
        Preprocess images and, optionally, their segmentation maps.

        Args:
            images: a PIL image, an array/tensor ((H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; uint8, uint16
                or float), a file path, or a list of these.
            segmentation_maps: optional class-index maps of the same sizes as the images (PIL "L"/"P"/"I" images,
                2-D arrays or tensors), returned as `labels` int64 (B, H, W).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, H, W) float32 and, with maps, `labels`.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _validate_preprocess_kwargs(self, size=None, size_divisor=None, do_center_crop=None, base_size=None,
                                    min_size=None, window_size=None, window_stride=None, **kwargs):  # fmt: skip
        super()._validate_preprocess_kwargs(size=size, do_center_crop=do_center_crop, **kwargs)
        check_evaluation_geometry(base_size, min_size, window_size, window_stride)
        if size is not None and not ((size.height and size.width) or size.shortest_edge):
            raise ValueError(
                f"size must be {{'height', 'width'}} or {{'shortest_edge'}} (optionally with 'longest_edge'); "
                f"got {dict(size)}"
            )
        if not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f"size_divisor must be a positive int (the model's patch size); got {size_divisor!r}")
        if do_center_crop:
            raise ValueError("WeakTrImageProcessor does not center-crop; pass do_center_crop=False")

    # ----------------------------------------------------------------------------------------------- inputs

    @staticmethod
    def _as_list(inputs, batch_ndim: int, kind: str) -> list:
        """Flatten one input or a batch of inputs to a list; an array with `batch_ndim` dims is a batch."""
        if isinstance(inputs, (list, tuple)):
            items = list(inputs)
        elif isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == batch_ndim:
            items = list(inputs)
        else:
            items = [inputs]
        if not items:
            raise ValueError(f"no {kind} given; pass at least one")
        return items

    @staticmethod
    def _open(item, index: int, kind: str):
        """Open file paths and URLs with PIL, keeping the file's mode (16-bit stays 16-bit)."""
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
                raise ValueError(f"{kind} {index}: {path!r} is not a file; pass an existing path or an image")
            return load_image_file(path)
        if not isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(
                f"{kind} {index} is a {type(item).__name__}; pass a PIL image, a numpy array, a tensor or a path"
            )
        return item

    def _image_to_tensor(self, image, index, do_convert_rgb, do_rescale, rescale_factor, input_data_format, device):
        """One image -> channels-first tensor (uint8, or float32 in the 8-bit range), RGB if asked."""
        image = self._open(image, index, "image")
        if isinstance(image, PIL.Image.Image):
            try:
                array = pil_image_to_array(image, convert_rgb=do_convert_rgb)
            except ValueError as error:
                raise ValueError(f"image {index}: {error}") from None
            tensor = torch.from_numpy(np.array(array))
            input_data_format, white = ChannelDimension.LAST, 255.0
        else:
            tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
            if tensor.dtype == torch.uint8:
                white = 255.0
            elif tensor.dtype == torch.uint16:
                tensor, white = tensor.to(torch.float32) * SIXTEEN_BIT_TO_EIGHT_BIT, 255.0
            elif tensor.is_floating_point():
                # Float arrays are taken as given: "white" is whatever rescaling maps to 1.0.
                tensor, white = tensor.to(torch.float32), (1.0 / rescale_factor if do_rescale else 1.0)
            else:
                raise ValueError(
                    f"image {index} has dtype {tensor.dtype}; pass uint8, uint16 or float images (float in the range "
                    "that `rescale_factor` maps to [0, 1], or set do_rescale=False)"
                )

        if tensor.ndim == 2:
            tensor = tensor[None]
        elif tensor.ndim == 3:
            if input_data_format is None:
                try:
                    input_data_format = infer_channel_dimension_format(tensor, num_channels=(1, 3, 4))
                except ValueError:
                    raise ValueError(
                        f"image {index} has shape {tuple(tensor.shape)}: expected (H, W), or 1, 3 or 4 channels "
                        "first or last; convert it to RGB or grey first"
                    ) from None
            if ChannelDimension(input_data_format) == ChannelDimension.LAST:
                tensor = tensor.permute(2, 0, 1)
        else:
            raise ValueError(f"image {index} has shape {tuple(tensor.shape)}; pass (H, W), (H, W, C) or (C, H, W)")

        channels = tensor.shape[0]
        if channels not in (1, 3, 4):
            raise ValueError(
                f"image {index} has {channels} channels; pass 1 (grey), 3 (RGB) or 4 (RGBA) channels, "
                "or set input_data_format if the channel axis was guessed wrongly"
            )
        if do_convert_rgb and channels == 1:
            tensor = tensor.expand(3, -1, -1)
        elif do_convert_rgb and channels == 4:
            rgb, alpha = tensor[:3].to(torch.float32), tensor[3:].to(torch.float32) / white
            tensor = rgb * alpha + white * (1.0 - alpha)
        return tensor.contiguous().to(device) if device is not None else tensor.contiguous()

    @staticmethod
    def _segmentation_map_to_tensor(segmentation_map, index) -> torch.Tensor:
        """One class-index map -> (1, H, W) int64 tensor."""
        segmentation_map = WeakTrImageProcessor._open(segmentation_map, index, "segmentation map")
        if isinstance(segmentation_map, PIL.Image.Image):
            if len(segmentation_map.getbands()) != 1:
                raise ValueError(
                    f"segmentation map {index} has mode {segmentation_map.mode!r}; give class indices as a "
                    "single-band 'L', 'P' or 'I' image or a 2-D array"
                )
            segmentation_map = np.asarray(segmentation_map)
        if isinstance(segmentation_map, np.ndarray):
            segmentation_map = torch.from_numpy(np.array(segmentation_map))
        tensor = segmentation_map
        if tensor.ndim == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]
        elif tensor.ndim == 3 and tensor.shape[-1] == 1:
            tensor = tensor[..., 0]
        if tensor.ndim != 2:
            raise ValueError(
                f"segmentation map {index} has shape {tuple(tensor.shape)}; give class indices as a 2-D (H, W) map"
            )
        return tensor.to(torch.int64)[None]

    # ------------------------------------------------------------------------------------------- geometry

    def _resized_size(self, height: int, width: int, size: SizeDict | None = None) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to (shared by preprocessing and post-processing)."""
        size = size if size is not None else self.size
        if size.height and size.width:
            return size.height, size.width
        return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)

    @staticmethod
    def _padded_canvas(sizes, size_divisor: int, pad_size: SizeDict | None) -> tuple[int, int]:
        """Common padded size of a batch: at least `pad_size`, rounded up to a multiple of `size_divisor`."""
        minimum = (pad_size.height or 0, pad_size.width or 0) if pad_size is not None else (0, 0)
        height = max([h for h, _ in sizes] + [minimum[0]])
        width = max([w for _, w in sizes] + [minimum[1]])
        return -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor

    @staticmethod
    def _pad(tensor: torch.Tensor, canvas: tuple[int, int], fill) -> torch.Tensor:
        """Pad at the bottom/right only, so the top-left pixels keep their coordinates."""
        pad_height, pad_width = canvas[0] - tensor.shape[-2], canvas[1] - tensor.shape[-1]
        if pad_height == 0 and pad_width == 0:
            return tensor
        return tvF.pad(tensor, [0, 0, pad_width, pad_height], fill=fill)

    def _resize(self, tensors, do_resize, size, resample, disable_grouping) -> list[torch.Tensor]:
        """Resize a list of (C, H, W) tensors, batching those of equal shape."""
        if not do_resize:
            return tensors
        grouped, index = group_images_by_shape(tensors, disable_grouping=disable_grouping)
        resized = {}
        for shape, stacked in grouped.items():
            height, width = self._resized_size(stacked.shape[-2], stacked.shape[-1], size)
            resized[shape] = self.resize(stacked, SizeDict(height=height, width=width), resample=resample)
        return reorder_images(resized, index)

    # -------------------------------------------------------------------------------------- preprocessing

    def _preprocess_image_like_inputs(
        self,
        images,
        segmentation_maps=None,
        *,
        do_convert_rgb,
        do_resize,
        size,
        resample,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        do_pad,
        pad_size,
        size_divisor,
        do_reduce_labels,
        base_size=None,
        min_size=None,
        window_size=None,
        window_stride=None,
        input_data_format=None,
        device=None,
        disable_grouping=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        images = [
            self._image_to_tensor(image, i, do_convert_rgb, do_rescale, rescale_factor, input_data_format, device)
            for i, image in enumerate(self._as_list(images, batch_ndim=4, kind="images"))
        ]
        if base_size or min_size or window_size:
            if segmentation_maps is not None:
                raise ValueError(
                    "segmentation maps are not resized or cut into windows by the evaluation geometry (base_size / "
                    "min_size / window_size); pass them to a processor without it, e.g. "
                    "WeakTrImageProcessor(size=..., do_resize=True)"
                )
            geometry = SimpleNamespace(do_resize=do_resize, base_size=base_size, min_size=min_size,
                                       window_size=window_size, window_stride=window_stride)  # fmt: skip
            crops = []
            for image in images:
                # As `segment`: normalise at the image's own size, then resize bilinearly without antialiasing.
                pixels = self.rescale_and_normalize(
                    image[None].to(torch.float32), do_rescale, rescale_factor, do_normalize, image_mean, image_std
                )
                for pass_size in evaluation_pass_sizes(tuple(image.shape[-2:]), geometry):
                    if pass_size != tuple(pixels.shape[-2:]):
                        pixels = F.interpolate(pixels, size=pass_size, mode="bilinear", align_corners=False)
                boxes = window_boxes(pixels.shape[-2:], window_size, resolved_window_stride(window_size, window_stride))
                crops.extend(pixels[0, :, top : top + h, left : left + w] for top, left, h, w in boxes)
            if do_pad:
                canvas = self._padded_canvas([crop.shape[-2:] for crop in crops], size_divisor, pad_size)
                crops = [self._pad(crop, canvas, fill=0.0) for crop in crops]
            if return_tensors is not None and len({tuple(crop.shape) for crop in crops}) > 1:
                raise ValueError(
                    f"the images' windows have different sizes {sorted({tuple(c.shape[-2:]) for c in crops})} and "
                    "cannot be stacked; process one image at a time, pass do_pad=True, or return_tensors=None"
                )
            return BatchFeature(data={"pixel_values": crops}, tensor_type=return_tensors)
        original_sizes = [tuple(image.shape[-2:]) for image in images]

        images = self._resize(images, do_resize, size, resample, disable_grouping)
        grouped, index = group_images_by_shape(images, disable_grouping=disable_grouping)
        normalized = {
            shape: self.rescale_and_normalize(
                stacked.to(torch.float32), do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            for shape, stacked in grouped.items()
        }
        images = reorder_images(normalized, index)
        canvas = self._padded_canvas([i.shape[-2:] for i in images], size_divisor, pad_size) if do_pad else None
        if canvas is not None:
            images = [self._pad(image, canvas, fill=0.0) for image in images]
        data = {"pixel_values": images}

        if segmentation_maps is not None:
            if isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim == 3:
                if segmentation_maps.shape[-1] == 1:  # one (H, W, 1) map, not H maps of width 1
                    segmentation_maps = segmentation_maps[..., 0]
            segmentation_maps = self._as_list(segmentation_maps, batch_ndim=3, kind="segmentation maps")
            maps = [self._segmentation_map_to_tensor(label_map, i) for i, label_map in enumerate(segmentation_maps)]
            if len(maps) != len(images):
                raise ValueError(f"got {len(images)} images but {len(maps)} segmentation maps; pass one map per image")
            for i, (label_map, original_size) in enumerate(zip(maps, original_sizes, strict=True)):
                if tuple(label_map.shape[-2:]) != original_size:
                    raise ValueError(
                        f"segmentation map {i} is {tuple(label_map.shape[-2:])} (height, width) but image {i} is "
                        f"{original_size}; give each image a map of its own size"
                    )
            if do_reduce_labels:
                maps = [reduce_labels(label_map) for label_map in maps]
            maps = self._resize(maps, do_resize, size, PILImageResampling.NEAREST, disable_grouping)
            if canvas is not None:
                maps = [self._pad(label_map, canvas, fill=IGNORE_INDEX) for label_map in maps]
            data["labels"] = [label_map[0].to(device) if device is not None else label_map[0] for label_map in maps]

        if return_tensors is not None and len({tuple(image.shape) for image in images}) > 1:
            raise ValueError(
                f"images were resized to different sizes {sorted({tuple(i.shape[-2:]) for i in images})} and cannot "
                "be stacked; use a fixed size {'height', 'width'}, do_pad=True, or return_tensors=None"
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------- post-processing

    def _target_sizes(self, target_sizes, batch_size: int) -> list[tuple[int, int]]:
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if len(target_sizes) != batch_size:
            raise ValueError(
                f"got {len(target_sizes)} target sizes for a batch of {batch_size}; pass one (height, width) per image"
            )
        return [(int(height), int(width)) for height, width in target_sizes]

    def _geometry(self, size=None, do_resize=None, size_divisor=None, do_pad=None) -> SimpleNamespace:
        """The preprocessing settings post-processing assumes: call-time values, else this processor's."""
        size_divisor = self.size_divisor if size_divisor is None else size_divisor
        if not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f"size_divisor must be a positive int (the model's patch size); got {size_divisor!r}")
        if size is None:
            size = self.size
        elif not isinstance(size, SizeDict):
            size = SizeDict(**get_size_dict(size=size, default_to_square=self.default_to_square))
        return SimpleNamespace(
            size=size,
            do_resize=self.do_resize if do_resize is None else do_resize,
            size_divisor=size_divisor,
            do_pad=self.do_pad if do_pad is None else do_pad,
            base_size=self.base_size,
            min_size=self.min_size,
            window_size=self.window_size,
            window_stride=resolved_window_stride(self.window_size, self.window_stride),
            evaluation=bool(self.base_size or self.min_size or self.window_size),
        )

    def _preprocessed_size(self, original_size: tuple[int, int], geometry) -> tuple[int, int]:
        """(height, width) of an image of `original_size` after preprocessing's resize (before padding/windows)."""
        if geometry.evaluation:
            return evaluation_size(original_size, geometry)
        return self._resized_size(*original_size, geometry.size) if geometry.do_resize else original_size

    def _cells_to_pixels(self, maps: torch.Tensor, size: tuple[int, int], original_size, geometry) -> torch.Tensor:
        """(C, h, w) patch-resolution maps of an input of `size` pixels (plus any padding) -> (1, C, H, W) maps
        covering exactly that input: upsampled and cropped where the input was padded, else left at (h, w).

        The maps cover `size_divisor` pixels per cell. Maps that cannot come from such an input are an error rather
        than a wrong crop.
        """
        covered = (maps.shape[-2] * geometry.size_divisor, maps.shape[-1] * geometry.size_divisor)
        # Without `do_pad` only the model pads, to the next multiple of the patch size; with it a batch may pad more.
        too_small = covered[0] < size[0] or covered[1] < size[1]
        too_large = not geometry.do_pad and (
            covered[0] >= size[0] + geometry.size_divisor or covered[1] >= size[1] + geometry.size_divisor
        )
        if too_small or too_large:
            settings = (
                f"base_size={geometry.base_size}, min_size={geometry.min_size}, window_size={geometry.window_size}"
                if geometry.evaluation
                else f"size={dict(geometry.size)}"
            )
            raise ValueError(
                f"maps of {maps.shape[-2]}x{maps.shape[-1]} cells x size_divisor {geometry.size_divisor} cover "
                f"{covered[0]}x{covered[1]} px, but an image of {original_size[0]}x{original_size[1]} gives "
                f"{size[0]}x{size[1]} px inputs after preprocessing with {settings}, do_resize={geometry.do_resize}, "
                f"do_pad={geometry.do_pad}. Pass post-processing the size / do_resize / do_pad given to "
                "preprocessing, and size_divisor=model.config.patch_size."
            )
        maps = maps[None].to(torch.float32)
        if covered != tuple(size):
            maps = F.interpolate(maps, size=covered, mode="bilinear", align_corners=False)
            maps = maps[..., : size[0], : size[1]]
        return maps

    def _stitch_windows(self, logits: torch.Tensor, sizes, geometry) -> list[torch.Tensor]:
        """Per-image (C, H, W) maps at the original sizes from the windows of the evaluation geometry, as
        `weaktr_hf.inference.segment` merges them at one scale: each window's logits upsampled to its pixels,
        averaged where windows overlap, then resized bilinearly to the original size."""
        maps, start = [], 0
        for original_size in sizes:
            size = self._preprocessed_size(original_size, geometry)
            boxes = window_boxes(size, geometry.window_size, geometry.window_stride)
            windows = logits[start : start + len(boxes)]
            start += len(boxes)
            if len(windows) < len(boxes):
                break
            total = logits.new_zeros((logits.shape[1], *size), dtype=torch.float32)
            count = total.new_zeros((1, *size))
            for (top, left, height, width), window in zip(boxes, windows, strict=True):
                pixels = self._cells_to_pixels(window, (height, width), original_size, geometry)
                if pixels.shape[-2:] != (height, width):  # no padding to crop: still one value per cell
                    pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
                total[:, top : top + height, left : left + width] += pixels[0]
                count[:, top : top + height, left : left + width] += 1
            total = total / count
            if tuple(size) != tuple(original_size):
                total = F.interpolate(total[None], size=original_size, mode="bilinear", align_corners=False)[0]
            maps.append(total)
        if start != len(logits):
            raise ValueError(
                f"the logits hold {len(logits)} maps but the {len(sizes)} target size(s) {sizes} give {start} window(s) "
                f"with base_size={geometry.base_size}, min_size={geometry.min_size}, window_size="
                f"{geometry.window_size}; pass the original size of every image given to preprocessing, in order"
            )
        return maps

    def _upsample_to_image(self, maps: torch.Tensor, original_size: tuple[int, int], geometry) -> torch.Tensor:
        """Bilinearly upsample patch-resolution (C, h, w) maps of one (unwindowed) input to the original image size.

        The maps cover `size_divisor` pixels per cell of the (resized, possibly padded) input; any bottom/right
        padding beyond the resized image is cropped before resizing to `original_size`. Maps that cannot come from
        an image of `original_size` preprocessed with `geometry` (e.g. a `size_divisor` other than the model's patch
        size, or a `size` given at preprocessing but not here) are an error rather than a wrong crop.
        """
        resized = self._preprocessed_size(original_size, geometry)
        maps = self._cells_to_pixels(maps, resized, original_size, geometry)
        return F.interpolate(maps, size=original_size, mode="bilinear", align_corners=False)[0]

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes=None,
        size=None,
        do_resize=None,
        size_divisor=None,
        do_pad=None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Turn [`WeakTrForSemanticSegmentation`] logits (B, num_labels, h, w) into label maps.

        Args:
            outputs: model outputs with `logits`.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` (B, 2), *optional*):
                The ORIGINAL (height, width) of each image. Logits are upsampled bilinearly, the padding (bottom/right)
                is cropped, then resized to the target. Without it, the argmax is taken at logits resolution (padding
                included).
            size / do_resize / do_pad (*optional*): what preprocessing used, when it was called with values other
                than this processor's (e.g. `processor(image, size=...)`); default: this processor's.
            size_divisor (`int`, *optional*): the model's patch size; default: this processor's.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`):
                Also return the logits each map is the argmax of, as transformers' segmentation processors do.

        Logits that cannot come from the target size under these settings raise an error instead of being cropped
        wrongly. With `do_pad` a map larger than the resized image is taken as batch padding, which cannot be told
        from a smaller call-time `size`: pass that `size` here too.

        Returns:
            `list[torch.Tensor]`: one (H, W) int64 CPU tensor of label ids per image; with
            `return_segmentation_scores=True`, one `SemanticSegmentationPostProcessorOutput` per image with
            `segmentation` (that map) and `segmentation_scores` ((num_labels, H, W) float CPU logits).
        """
        logits = outputs.logits
        geometry = self._geometry(size, do_resize, size_divisor, do_pad)
        if target_sizes is None:
            if geometry.window_size:
                raise ValueError(
                    "this processor cuts images into windows (window_size "
                    f"{geometry.window_size}); pass target_sizes (the original (height, width) of each image) so the "
                    "windows can be stitched back"
                )
            maps = list(logits)
        elif geometry.evaluation:
            if isinstance(target_sizes, torch.Tensor):
                target_sizes = target_sizes.tolist()
            maps = self._stitch_windows(logits, [(int(h), int(w)) for h, w in target_sizes], geometry)
        else:
            sizes = self._target_sizes(target_sizes, len(logits))
            maps = [self._upsample_to_image(logit, size, geometry) for logit, size in zip(logits, sizes, strict=True)]
        segmentations = [scores.argmax(dim=0).to(torch.int64).cpu() for scores in maps]
        if not return_segmentation_scores:
            return segmentations
        return [
            SemanticSegmentationPostProcessorOutput(data={"segmentation": labels, "segmentation_scores": scores.cpu()})
            for labels, scores in zip(segmentations, maps, strict=True)
        ]

    def post_process_cams(
        self,
        outputs,
        labels,
        target_sizes=None,
        threshold: float = 0.43,
        cam: str = "fine_cam",
        size=None,
        do_resize=None,
        size_divisor=None,
        do_pad=None,
    ) -> list[torch.Tensor]:
        """
        Turn [`WeakTrForCAM`] CAMs into pseudo-label maps (single scale, no CRF).

        ReLU, upsample bilinearly (cropping padding as in `post_process_semantic_segmentation`), zero the classes
        absent from `labels`, min-max normalise each present class to [0, 1] (`normalize_cams`), then argmax over
        [threshold, CAMs] (`cams_to_label_map`).

        Args:
            outputs: a `WeakTrCAMOutput` (or anything with the attribute named by `cam`, shape (B, C, h, w)).
            labels: image-level labels, a multi-hot (B, C) tensor/array or a list of lists of class ids.
            target_sizes (*optional*): the ORIGINAL (height, width) of each image; without it, maps stay at (h, w).
            threshold (`float`, defaults to 0.43): background score (0.43 VOC, 0.42 COCO in the paper).
            cam (`str`, defaults to `"fine_cam"`): `"fine_cam"`, `"coarse_cam"` or `"cross_attention"`.
            size / do_resize / do_pad / size_divisor (*optional*): as in `post_process_semantic_segmentation`.

        Returns:
            `list[torch.Tensor]`: one (H, W) int64 CPU tensor per image, 0 = background, k + 1 = foreground class k.
        """
        if cam not in CAM_OUTPUT_NAMES:
            raise ValueError(f"cam must be one of {CAM_OUTPUT_NAMES}; got {cam!r}")
        cams = getattr(outputs, cam, None)
        if cams is None:
            raise ValueError(f"outputs have no {cam!r}; pass the output of WeakTrForCAM")
        batch_size, num_classes = cams.shape[:2]
        present = self._present_classes(labels, batch_size, num_classes)
        sizes = self._target_sizes(target_sizes, batch_size) if target_sizes is not None else None
        geometry = self._geometry(size, do_resize, size_divisor, do_pad)
        if geometry.window_size:
            raise ValueError(
                f"post_process_cams takes one CAM per image, but this processor cuts images into windows (window_size "
                f"{geometry.window_size}); preprocess CAM inputs with a processor without window_size"
            )
        label_maps = []
        for i in range(batch_size):
            maps = cams[i].to(torch.float32).relu()  # ReLU before upsampling, as generate_cams does
            if sizes is not None:
                maps = self._upsample_to_image(maps, sizes[i], geometry)
            maps = normalize_cams(maps, present[i])
            label_maps.append(cams_to_label_map(maps, present[i], threshold).to(torch.int64).cpu())
        return label_maps

    @staticmethod
    def _present_classes(labels, batch_size: int, num_classes: int) -> torch.Tensor:
        """Image-level labels (multi-hot tensor/array, or lists of class ids) -> boolean (B, C)."""
        if isinstance(labels, (torch.Tensor, np.ndarray)):
            present = torch.as_tensor(labels)
            if tuple(present.shape) != (batch_size, num_classes):
                raise ValueError(
                    f"labels have shape {tuple(present.shape)} but the CAMs need multi-hot "
                    f"({batch_size}, {num_classes})"
                )
            return present > 0
        if len(labels) != batch_size:
            raise ValueError(f"got class-id lists for {len(labels)} images but the CAMs hold {batch_size}")
        present = torch.zeros(batch_size, num_classes, dtype=torch.bool)
        for i, class_ids in enumerate(labels):
            for class_id in class_ids:
                if not 0 <= int(class_id) < num_classes:
                    raise ValueError(f"image {i} has class id {class_id}; ids must be in [0, {num_classes})")
                present[i, int(class_id)] = True
        return present


def evaluation_processor(window_size, window_stride=None, base_size=None, min_size=None, patch_size=16,
                         image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD, size=None):  # fmt: skip
    """The image processor of a segmenter that gives the eval stage's single-scale prediction: no resize to a fixed
    size but `segment`'s geometry (short side to `base_size`, passes below `min_size` upsampled, `window_size`
    windows every `window_stride` pixels). `size` (default the window) is kept for code that reads it."""
    size = size or window_size
    return WeakTrImageProcessor(
        size={"height": size, "width": size}, size_divisor=patch_size, image_mean=list(image_mean),
        image_std=list(image_std), base_size=base_size, min_size=min_size, window_size=window_size,
        window_stride=resolved_window_stride(window_size, window_stride),
    )  # fmt: skip


__all__ = [
    "EVAL_MAX_RATIO",
    "IMAGE_STATISTICS",
    "WeakTrImageProcessor",
    "evaluation_processor",
    "segment_pass_size",
    "window_boxes",
    "normalize_cams",
    "cams_to_label_map",
    "load_image_file",
    "pil_image_to_array",
    "pil_image_to_uint8",
    "reduce_labels",
]
