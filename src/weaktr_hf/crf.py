"""Dense CRF refinement (Krähenbühl & Koltun) of WeakTr's pseudo-labels and segmentation probabilities.

WeakTr refines its step-1 pseudo-labels with a dense CRF whose unary comes from the hard label map (paper Sec. 3.3;
hustvl/WeakTr `tool/imutils.py`), and can refine step-2 predictions with a CRF on the softmax probabilities
(`OnlineRetraining/segm/eval/densecrf.py`). Both run `pydensecrf` (package `pydensecrf2`, the `crf` extra)
and follow the call order of the authors' code: unary, Gaussian kernel, bilateral kernel on the RGB image, mean-field
inference.
"""

from types import MappingProxyType

import numpy as np

from .labels import IGNORE_INDEX

INSTALL_HINT = 'pip install "weaktr-hf[crf]" (pydensecrf2 builds from source: it needs a C++ compiler)'

# The authors' pseudo-label CRF (their `crf_inference_label` / `crf_inference_label_coco`). Read-only; pass them as
# `crf_refine_labels(image, labels, num_labels, **VOC_PSEUDO_LABEL_CRF)` and override single values by keyword.
VOC_PSEUDO_LABEL_CRF = MappingProxyType(
    {
        "gt_prob": 0.7,
        "gaussian_sxy": 4,
        "gaussian_compat": 3,
        "bilateral_sxy": 83,
        "bilateral_srgb": 5,
        "bilateral_compat": 3,
        "iterations": 10,
    }
)
COCO_PSEUDO_LABEL_CRF = MappingProxyType(
    {
        "gt_prob": 0.7,
        "gaussian_sxy": 3,
        "gaussian_compat": 3,
        "bilateral_sxy": 50,
        "bilateral_srgb": 5,
        "bilateral_compat": 10,
        "iterations": 10,
    }
)
# The step-2 evaluation CRF on softmax probabilities: VOC (their `crf_inference_voc12`,
# OnlineRetraining/segm/eval/densecrf.py:4-37) and COCO (`crf_inference_coco`, densecrf.py:40-70).
SEGMENTATION_CRF = MappingProxyType(
    {
        "gaussian_sxy": 3,
        "gaussian_compat": 3,
        "bilateral_sxy": 83,
        "bilateral_srgb": 5,
        "bilateral_compat": 3,
        "iterations": 10,
    }
)

COCO_SEGMENTATION_CRF = MappingProxyType(
    {
        "gaussian_sxy": 1,
        "gaussian_compat": 3,
        "bilateral_sxy": 67,
        "bilateral_srgb": 3,
        "bilateral_compat": 4,
        "iterations": 10,
    }
)


def crf_available():
    """Whether the dense CRF can run here (pydensecrf2 is installed)."""
    import importlib.util

    return importlib.util.find_spec("pydensecrf") is not None


def _import_densecrf():
    """`pydensecrf.densecrf` and `pydensecrf.utils`, or an ImportError that says how to install them."""
    try:
        import pydensecrf.utils as densecrf_utils
        from pydensecrf import densecrf
    except ImportError as error:
        raise ImportError(
            f"The dense CRF needs the pydensecrf package, which is not installed. Install it with: {INSTALL_HINT}. "
            "To go without it, skip the CRF (the training script's --no_crf)."
        ) from error
    return densecrf, densecrf_utils


def _check_image(image, height, width, what):
    """The image as a C-contiguous uint8 (height, width, 3) array, as pydensecrf requires."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an RGB array of shape (height, width, 3), got shape {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 RGB (the original 0..255 pixels, not normalised pixel_values), got {image.dtype}."
        )
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"image size {image.shape[:2]} differs from the {what} size {(height, width)}; "
            f"resize the {what} to the image first."
        )
    return np.ascontiguousarray(image)


def _run_crf(
    image,
    unary,
    num_labels,
    gaussian_sxy,
    gaussian_compat,
    bilateral_sxy,
    bilateral_srgb,
    bilateral_compat,
    iterations,
):
    """Mean-field inference of a dense CRF with the given unary (num_labels, H*W); returns Q as (num_labels, H, W)."""
    densecrf, _ = _import_densecrf()
    height, width = image.shape[:2]
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_labels, height, width)


def crf_refine_labels(
    image_uint8_hwc,
    label_map,
    num_labels,
    gt_prob=0.7,
    gaussian_sxy=4,
    gaussian_compat=3,
    bilateral_sxy=83,
    bilateral_srgb=5,
    bilateral_compat=3,
    iterations=10,
    ignore_index=IGNORE_INDEX,
):
    """Refine a hard label map with a dense CRF whose unary trusts each pixel's label with probability `gt_prob`.

    Every pixel labelled `c` gets -log(gt_prob) for `c` and -log((1 - gt_prob) / (num_labels - 1)) for the other
    labels, as the authors' pseudo-label CRF does. Pixels equal to `ignore_index` are "unknown": their unary is
    uniform, so the CRF fills them from the image and their neighbours; the result has no ignored pixels.

    For parity with the authors, pass the label map over the classes in play only (0 = background, k = the k-th class
    of the image-level label) with `num_labels` = 1 + the number of those classes, then map the result back to
    dataset ids: `num_labels` sets the off-label energy, so a map over all 21 VOC labels gives different results.

    Returns an int64 (height, width) label map with values in 0..num_labels-1.
    """
    _, densecrf_utils = _import_densecrf()
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label_map must be (height, width), got shape {label_map.shape}.")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must hold integer labels, got dtype {label_map.dtype}.")
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2 (background and one class), got {num_labels}.")
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be strictly between 0 and 1, got {gt_prob}.")
    image = _check_image(image_uint8_hwc, *label_map.shape, what="label map")
    unknown = label_map == ignore_index
    known = label_map[~unknown]
    if known.size and (known.min() < 0 or known.max() >= num_labels):
        bad = known[(known < 0) | (known >= num_labels)][0]
        raise ValueError(
            f"label_map holds {bad}, outside 0..{num_labels - 1} and not ignore_index={ignore_index}; "
            "pass num_labels covering every label in the map."
        )
    # pydensecrf's "zero means unsure" mode: shift labels up by one and mark unknown pixels 0. For known pixels the
    # unary equals the plain (zero_unsure=False) one the authors use; unknown pixels get a uniform unary.
    shifted = np.where(unknown, 0, label_map.astype(np.int64) + 1)
    unary = densecrf_utils.unary_from_labels(shifted, num_labels, gt_prob=gt_prob, zero_unsure=True)
    pairwise = (gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat, iterations)
    q = _run_crf(image, unary, num_labels, *pairwise)
    return q.argmax(axis=0).astype(np.int64)


def crf_refine_probs(
    image,
    probs,
    gaussian_sxy=3,
    gaussian_compat=3,
    bilateral_sxy=83,
    bilateral_srgb=5,
    bilateral_compat=3,
    iterations=10,
):
    """Refine per-pixel class probabilities (num_labels, height, width) with a dense CRF (step-2 inference).

    The unary is -log(max(p, 1e-5)), as pydensecrf's `unary_from_softmax` gives; returns the CRF's marginals as a
    float32 (num_labels, height, width) array whose argmax is the refined prediction.
    """
    _, densecrf_utils = _import_densecrf()
    if hasattr(probs, "detach"):  # torch tensor
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(
            f"probs must be softmax probabilities of shape (num_labels >= 2, height, width), got {probs.shape}."
        )
    if not np.isfinite(probs).all():
        raise ValueError("probs holds NaN or infinite values; pass softmax probabilities.")
    image = _check_image(image, *probs.shape[1:], what="probability map")
    unary = densecrf_utils.unary_from_softmax(probs)
    pairwise = (gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat, iterations)
    return _run_crf(image, unary, probs.shape[0], *pairwise)


def crf_refine_present_classes(image, probs, **crf_parameters):
    """The authors' step-2 evaluation CRF (OnlineRetraining/segm/eval/miou.py:87-96, make_crf.py:141-163): keep only
    the classes that win somewhere in `probs.argmax(0)`, refine their probabilities with `crf_refine_probs`, and map
    the CRF's argmax back to class ids.

    `probs` (num_labels, height, width) are used as given (no renormalisation over the kept classes, as theirs).
    Returns an int64 (height, width) label map.
    """
    if hasattr(probs, "detach"):  # torch tensor
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (num_labels, height, width), got {probs.shape}.")
    keys = np.unique(probs.argmax(axis=0))
    if len(keys) == 1:  # one class wins everywhere: a one-label CRF changes nothing
        return np.full(probs.shape[1:], keys[0], dtype=np.int64)
    refined = crf_refine_probs(image, probs[keys], **crf_parameters)
    return keys[refined.argmax(axis=0)].astype(np.int64)
