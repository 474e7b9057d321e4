"""Pictures of WeakTr's outputs: coloured label maps, CAM heat-map overlays, side-by-side panels, label PNGs.

One colour palette serves every picture: the PASCAL VOC palette, so our masks look like (and are byte-compatible
with) VOC's own SegmentationClass PNGs. Label PNGs store class indices with that palette attached.
"""

import os
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .image_processing_weaktr import pil_image_to_uint8
from .labels import IGNORE_INDEX


def voc_palette(num_entries=256):
    """The VOC colour map: the bits of each label index are dealt out, 3 at a time, to R, G and B from the top bit.

    Returns a uint8 array of shape (num_entries, 3); entry 0 is black, 1 is (128, 0, 0), 255 (ignore) is
    (224, 224, 192), the cream outline colour of VOC's masks.
    """
    index = np.arange(num_entries)
    colors = np.zeros((num_entries, 3), dtype=np.int64)
    for bit_position in range(8):
        bits = index >> (3 * bit_position)
        for channel in range(3):
            colors[:, channel] |= ((bits >> channel) & 1) << (7 - bit_position)
    return colors.astype(np.uint8)


PALETTE = voc_palette()
FIGURE_MIN_SIDE = 256  # px: the shorter side of a figure panel, so that 64-px images stay readable


def _as_label_array(mask, name="mask"):
    """A uint8 (height, width) array of label indices 0..255, or a ValueError saying what is wrong."""
    if isinstance(mask, Image.Image):
        if mask.mode not in ("P", "L"):
            raise ValueError(f"{name} must be a label image (mode 'P' or 'L'), got mode {mask.mode!r}.")
        return np.array(mask)
    if hasattr(mask, "detach"):  # torch tensor
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a (height, width) label map, got shape {mask.shape}.")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {mask.dtype}; argmax the logits first.")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(
            f"{name} values must lie in 0..255 to fit a palette PNG, got {mask.min()}..{mask.max()}; "
            f"use {IGNORE_INDEX} for ignored pixels."
        )
    return mask.astype(np.uint8)


def colorize_mask(mask):
    """A label map (height, width) of indices 0..255 as a palette ("P") image coloured with `PALETTE`."""
    image = Image.fromarray(_as_label_array(mask), mode="P")
    image.putpalette(PALETTE.tobytes())
    return image


def overlay_mask(image, mask, alpha=0.5):
    """Blend a label map's `PALETTE` colours over an image: (1 - alpha) * image + alpha * colour, background (0) left
    as it is. `mask` is (height, width) at the image's size. Returns an RGB PIL image."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    rgb = _as_rgb_array(image).astype(np.float32)
    labels = _as_label_array(mask)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"mask of shape {labels.shape} does not match the image's {rgb.shape[:2]}.")
    blended = np.where((labels > 0)[..., None], (1.0 - alpha) * rgb + alpha * PALETTE[labels], rgb)
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


def jet_colormap(values):
    """Blue -> cyan -> yellow -> red colours for values in [0, 1], shape (..., 3) uint8 (a piecewise-linear jet)."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where red, green and blue peak
    colors = np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)
    return np.round(colors * 255).astype(np.uint8)


def _as_rgb_array(image):
    """A uint8 (height, width, 3) array from a PIL image (converted as the model's input is) or an array."""
    if isinstance(image, Image.Image):
        return pil_image_to_uint8(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 RGB of shape (height, width, 3), got {image.dtype} of shape {image.shape}."
        )
    return image


def overlay_cam(image, cam, alpha=0.5):
    """Blend a class activation map over an RGB image: (1 - alpha) * image + alpha * jet(cam).

    `cam` is (h, w) with values in [0, 1] (min-max normalised, as WeakTr's CAMs are before thresholding), at any
    resolution: it is resized bilinearly to the image. Returns an RGB PIL image the size of `image`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    rgb = _as_rgb_array(image)
    if hasattr(cam, "detach"):
        cam = cam.detach().float().cpu().numpy()
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be one class's map of shape (height, width), got shape {cam.shape}.")
    if not np.isfinite(cam).all() or cam.min() < -1e-6 or cam.max() > 1 + 1e-6:
        raise ValueError("cam values must lie in [0, 1]; min-max normalise the CAM first.")
    height, width = rgb.shape[:2]
    if cam.shape != (height, width):
        cam = np.asarray(Image.fromarray(cam, mode="F").resize((width, height), Image.BILINEAR))
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * jet_colormap(cam).astype(np.float32)
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


def font(size=14):
    """A scalable font of `size` px when Pillow has FreeType, else Pillow's small built-in bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def upscale(image, min_side=256):
    """Enlarge an image by an integer factor with nearest-neighbour sampling until its shorter side is at least
    `min_side` px: label maps keep their exact labels and pixels stay sharp. Larger images are returned as they are."""
    factor = max(1, -(-min_side // max(1, min(image.size))))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def class_legend(class_names, width=None, text_size=14, gap=4):
    """A strip of colour swatches with class names, label 0 first (the palette colours of `colorize_mask`), wrapped
    into rows of at most `width` px."""
    text_font = font(text_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch = text_size + 2
    items = [(index, str(name), swatch + gap + measure.textbbox((0, 0), str(name), font=text_font)[2] + 3 * gap)
             for index, name in enumerate(class_names)]  # fmt: skip
    width = width or sum(item[2] for item in items)
    rows, row, used = [], [], 0
    for item in items:
        if row and used + item[2] > width:
            rows.append(row)
            row, used = [], 0
        row.append(item)
        used += item[2]
    rows.append(row)
    line = swatch + gap
    canvas = Image.new("RGB", (max(width, max(sum(i[2] for i in r) for r in rows)), line * len(rows) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for row_index, row in enumerate(rows):
        x, y = gap, gap + row_index * line
        for index, name, item_width in row:
            draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=tuple(int(c) for c in PALETTE[index]),
                           outline=(0, 0, 0))  # fmt: skip
            draw.text((x + swatch + gap, y), name, fill=(0, 0, 0), font=text_font)
            x += item_width
    return canvas


def side_by_side(images, titles=None, gap=4, background=(255, 255, 255), min_side=None, legend=None):
    """Paste images left to right (e.g. image, prediction, ground truth) into one RGB picture, titles above them.

    Items may be PIL images, uint8 RGB arrays, or 2-D label maps (coloured with `PALETTE`). With `min_side`, every
    panel is enlarged (nearest neighbour, see `upscale`) to at least that many px; with `legend` (class names, label
    0 first), a colour legend of the label maps goes underneath.
    """
    images = list(images)
    if not images:
        raise ValueError("side_by_side needs at least one image.")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images; give one title per image or none.")
    panels = []
    for item in images:
        if isinstance(item, Image.Image):
            panels.append(Image.fromarray(pil_image_to_uint8(item), mode="RGB"))
        elif np.asarray(item).ndim == 2 or hasattr(item, "detach"):
            panels.append(colorize_mask(item).convert("RGB"))
        else:
            panels.append(Image.fromarray(_as_rgb_array(item), mode="RGB"))
    if min_side:
        panels = [upscale(panel, min_side) for panel in panels]
    title_font = font(16) if min_side else None
    title_height = 0
    if titles is not None:
        font_box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=title_font)
        title_height = font_box[3] + gap
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    height = max(panel.height for panel in panels) + title_height
    legend_image = class_legend(legend, width) if legend is not None else None
    canvas = Image.new("RGB", (width, height + (legend_image.height if legend_image else 0)), background)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for index, panel in enumerate(panels):
        if titles is not None:
            draw.text((x, 0), str(titles[index]), fill=(0, 0, 0), font=title_font)
        canvas.paste(panel, (x, title_height))
        x += panel.width + gap
    if legend_image:
        canvas.paste(legend_image, (0, height))
    return canvas


def bar_chart(values, reference=None, reference_label="baseline", title=None, size=(720, 400), value_format="{:.1f}"):
    """Vertical bars for `values` ({label: number}), each with its number on top, and an optional dashed
    horizontal line at `reference` (e.g. a baseline). Missing values (None) are left out. Returns an RGB image."""
    values = {str(label): float(value) for label, value in values.items() if value is not None}
    if not values:
        raise ValueError("bar_chart needs at least one value that is not None.")
    width, height = size
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    text_font, small_font = font(15), font(12)
    top = 52 if title and reference is not None else 34 if title or reference is not None else 12
    bottom, left, right = 64, 44, 12
    top_value = max([*values.values(), reference or 0.0]) * 1.15 or 1.0
    plot_height = height - top - bottom

    def y_of(value):
        return top + plot_height * (1 - value / top_value)

    if title:
        draw.text((left, 8), title, fill=(0, 0, 0), font=text_font)
    draw.line((left, top, left, height - bottom), fill=(0, 0, 0))
    draw.line((left, height - bottom, width - right, height - bottom), fill=(0, 0, 0))
    step = 10 ** np.floor(np.log10(top_value / 2))
    step *= 1 if top_value / step >= 4 else 0.5 if top_value / step >= 2 else 0.2  # 4 to 10 round ticks
    for tick in np.arange(step, top_value, step):
        draw.line((left - 4, y_of(tick), left, y_of(tick)), fill=(0, 0, 0))
        draw.text((2, y_of(tick) - 7), f"{tick:g}", fill=(0, 0, 0), font=small_font)
    slot = (width - left - right) / len(values)
    for index, (label, value) in enumerate(values.items()):
        x0, x1 = left + slot * (index + 0.15), left + slot * (index + 0.85)
        above = reference is None or value >= reference
        colour = (70, 130, 180) if above else (214, 96, 77)
        draw.rectangle((x0, y_of(max(value, 0.0)), x1, height - bottom), fill=colour)
        draw.text(((x0 + x1) / 2, y_of(max(value, 0.0)) - 4), value_format.format(value), fill=(0, 0, 0),
                  font=small_font, anchor="mb")  # fmt: skip
        for line_index, part in enumerate(_wrap(label, max(4, int(slot / 7)))[:3]):
            draw.text(((x0 + x1) / 2, height - bottom + 4 + 14 * line_index), part, fill=(0, 0, 0), font=small_font,
                      anchor="ma")  # fmt: skip
    if reference is not None:
        label_y = 28 if title else 8  # under the title
        key = (label_y + 8, width - right - 230, width - right - 190)  # the dashed sample beside the label, top right
        for y, x_start, x_end in ((y_of(reference), left, width - right), key):
            for x in range(x_start, x_end, 12):
                draw.line((x, y, min(x + 6, x_end), y), fill=(0, 0, 0), width=2)
        label = f"{reference_label} ({value_format.format(reference)})"
        draw.text((width - right - 184, label_y), label, fill=(0, 0, 0), font=small_font)
    return canvas


def _wrap(text, characters):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > characters:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def save_label_png(path, mask, text=None):
    """Write a label map as a palette PNG, atomically: a crash mid-write never leaves a partial file at `path`.

    The PNG is written to a temporary file in the same folder and then renamed over `path` (`os.replace`), so a
    resumed run that finds `path` can trust it. `text` (a dict of strings) is stored as PNG text chunks ahead of the
    pixels, where `Image.open(path).info` reads it without decoding them.
    """
    image = colorize_mask(mask)
    pnginfo = None
    if text:
        pnginfo = PngImagePlugin.PngInfo()
        for key, value in text.items():
            pnginfo.add_text(key, value)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A unique hidden name next to the target (same filesystem, so the rename is atomic); opened with open() rather
    # than mkstemp so the PNG gets the usual permissions.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as file:
            image.save(file, format="PNG", pnginfo=pnginfo)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_label_png(path):
    """Read a label PNG's class indices (not its colours) as a uint8 (height, width) array."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path} is a {image.mode!r} image, not a label PNG of class indices (mode 'P' or 'L'); "
                "colour renderings cannot be read back as labels."
            )
        return np.array(image)
