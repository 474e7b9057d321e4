import sys

import numpy as np
import pytest

from weaktr_hf.crf import (
    COCO_PSEUDO_LABEL_CRF,
    SEGMENTATION_CRF,
    VOC_PSEUDO_LABEL_CRF,
    crf_refine_labels,
    crf_refine_probs,
)


def two_region_scene(height=32, width=40, flip_fraction=0.25, seed=0):
    """A dark left half (class 0) and a bright right half (class 1), and a copy of the labels with pixels flipped."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), dtype=np.int64)
    truth[:, width // 2 :] = 1
    image = np.where(truth[..., None] == 1, 220, 30) + rng.integers(-10, 10, size=(height, width, 3))
    noisy = truth.copy()
    flipped = rng.random(truth.shape) < flip_fraction
    noisy[flipped] = 1 - noisy[flipped]
    return image.astype(np.uint8), truth, noisy


@pytest.mark.parametrize("preset", [VOC_PSEUDO_LABEL_CRF, COCO_PSEUDO_LABEL_CRF], ids=["voc", "coco"])
def test_label_crf_cleans_noisy_two_region_labels(preset):
    image, truth, noisy = two_region_scene()
    refined = crf_refine_labels(image, noisy, num_labels=2, **preset)
    assert refined.shape == truth.shape
    assert (noisy == truth).mean() < 0.8
    assert (refined == truth).mean() > 0.95


def test_label_crf_fills_ignored_pixels_from_the_image():
    image, _, noisy = two_region_scene()
    noisy[4:12, 4:12] = 255  # an unknown block inside the dark region
    noisy[20:28, 26:34] = 255  # and one inside the bright region
    refined = crf_refine_labels(image, noisy, num_labels=2, **VOC_PSEUDO_LABEL_CRF)
    assert not (refined == 255).any()
    assert (refined[4:12, 4:12] == 0).mean() > 0.9
    assert (refined[20:28, 26:34] == 1).mean() > 0.9


def test_label_crf_without_ignored_pixels_matches_plain_label_unary():
    """With no unknown pixels the unary is the plain one (every label trusted with gt_prob), as the authors use."""
    from pydensecrf import densecrf
    from pydensecrf.utils import unary_from_labels

    image, _, noisy = two_region_scene(seed=1)
    noisy[::5, ::7] = 2  # a third label, so the off-label energy depends on num_labels
    height, width = noisy.shape
    crf = densecrf.DenseCRF2D(width, height, 3)
    crf.setUnaryEnergy(unary_from_labels(noisy, 3, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=4, compat=3)
    crf.addPairwiseBilateral(sxy=83, srgb=5, rgbim=np.ascontiguousarray(image), compat=3)
    expected = np.asarray(crf.inference(10)).reshape(3, height, width).argmax(axis=0)
    np.testing.assert_array_equal(crf_refine_labels(image, noisy, num_labels=3, **VOC_PSEUDO_LABEL_CRF), expected)


def test_probability_crf_returns_sharpened_distributions():
    image, truth, noisy = two_region_scene()
    probs = np.stack([np.where(noisy == 0, 0.8, 0.2), np.where(noisy == 1, 0.8, 0.2)]).astype(np.float32)
    refined = crf_refine_probs(image, probs, **SEGMENTATION_CRF)
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)
    assert (refined.argmax(axis=0) == truth).mean() > 0.95


def test_size_and_type_mismatches_raise_value_errors():
    image, _, noisy = two_region_scene()
    with pytest.raises(ValueError, match="differs from the label map size"):
        crf_refine_labels(image[:-1], noisy, num_labels=2)
    with pytest.raises(ValueError, match="differs from the probability map size"):
        crf_refine_probs(image[:, :-1], np.full((2, *noisy.shape), 0.5))
    with pytest.raises(ValueError, match="must be uint8"):
        crf_refine_labels(image.astype(np.float32), noisy, num_labels=2)
    with pytest.raises(ValueError, match="label_map holds 5"):
        crf_refine_labels(image, np.where(noisy == 1, 5, 0), num_labels=2)


def test_missing_pydensecrf_names_the_install_command(monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import pydensecrf...` fail
    image, _, noisy = two_region_scene()
    with pytest.raises(ImportError, match=r'pip install "weaktr-hf\[crf\]"'):
        crf_refine_labels(image, noisy, num_labels=2)
    with pytest.raises(ImportError, match=r"weaktr-hf\[crf\]"):
        crf_refine_probs(image, np.full((2, *noisy.shape), 0.5))
