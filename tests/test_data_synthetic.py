"""The built-in synthetic WSSS dataset: deterministic, exact masks, and not solvable by colour thresholding."""

import numpy as np
import pytest

from weaktr_hf.data import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_CONFIGURATIONS,
    get_class_names,
    get_metadata,
    load_wsss_dataset,
    trivial_baseline_miou,
    trivial_baseline_prediction,
    wsss_features,
)


@pytest.fixture(scope="module")
def synthetic():
    return load_wsss_dataset("synthetic", num_classes=4, image_size=(64, 80), num_train=24, num_val=60, seed=3)


def test_same_seed_same_data_other_seed_other_data(synthetic):
    again = load_wsss_dataset("synthetic", split="train", num_classes=4, image_size=(64, 80), num_train=24, seed=3)
    other = load_wsss_dataset("synthetic", split="train", num_classes=4, image_size=(64, 80), num_train=24, seed=4)

    for a, b in zip(synthetic["train"], again, strict=True):
        assert a["labels"] == b["labels"]
        np.testing.assert_array_equal(np.array(a["image"]), np.array(b["image"]))
        np.testing.assert_array_equal(np.array(a["semantic_mask"]), np.array(b["semantic_mask"]))
    assert synthetic["train"]["labels"] != other["labels"] or any(
        np.array(a["image"]).shape != np.array(b["image"]).shape
        or (np.array(a["image"]) != np.array(b["image"])).any()
        for a, b in zip(synthetic["train"], other, strict=True)
    )


def test_a_larger_split_extends_a_smaller_one(synthetic):
    small = load_wsss_dataset("synthetic", split="train", num_classes=4, image_size=(64, 80), num_train=5, seed=3)

    for a, b in zip(small, synthetic["train"].select(range(5)), strict=True):
        np.testing.assert_array_equal(np.array(a["image"]), np.array(b["image"]))


def test_schema_sizes_and_masks_agree_with_labels(synthetic):
    assert synthetic["train"].features == wsss_features(SYNTHETIC_CLASSES[:4])
    assert get_class_names(synthetic) == ["disc", "square", "triangle", "cross"]
    assert get_metadata(synthetic)["synthetic"]["seed"] == 3
    assert len(synthetic["train"]) == 24 and len(synthetic["val"]) == 60
    assert not set(synthetic["train"]["id"]) & set(synthetic["val"]["id"])
    counts = set()
    for row in synthetic["train"]:
        image, mask = np.array(row["image"]), np.array(row["semantic_mask"])
        assert image.shape[:2] == mask.shape and 64 <= mask.shape[0] <= 80 and 64 <= mask.shape[1] <= 80
        assert row["labels"] == sorted(int(v) - 1 for v in np.unique(mask) if v > 0)
        counts.add(len(row["labels"]))
        foreground = (mask > 0).mean()
        assert 0.03 < foreground < 0.9  # objects are a reasonable part of the image, never all of it
    assert counts == {1, 2, 3}


def test_colour_threshold_baseline_is_clearly_below_perfect(synthetic):
    score = trivial_baseline_miou(synthetic["val"])

    assert 0.1 < score < 0.75  # it finds objects roughly but cannot tell classes or textures apart


def test_baseline_scores_one_on_flat_single_objects():
    """The baseline itself is sound: a flat object on a flat background is solved exactly."""
    image = np.full((20, 20, 3), 40, dtype=np.uint8)
    image[5:12, 6:15] = (220, 30, 30)
    expected = np.zeros((20, 20), dtype=np.int64)
    expected[5:12, 6:15] = 3

    np.testing.assert_array_equal(trivial_baseline_prediction(image, [2], threshold=0.3), expected)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="num_classes must be in 1..8"):
        load_wsss_dataset("synthetic", num_classes=9, num_train=1, num_val=1)
    with pytest.raises(ValueError, match="at least 32 px"):
        load_wsss_dataset("synthetic", image_size=16, num_train=1, num_val=1)
    with pytest.raises(ValueError, match="object_size"):
        load_wsss_dataset("synthetic", object_size=(0.3, 0.2), num_train=1, num_val=1)
    with pytest.raises(ValueError, match="clutter"):
        load_wsss_dataset("synthetic", clutter=0, num_train=1, num_val=1)


def _foreground_share_and_background_spread(**options):
    rows = load_wsss_dataset("synthetic", split="val", image_size=64, num_val=24, seed=5, **options)
    masks = np.stack([np.asarray(row["semantic_mask"]) for row in rows])
    images = np.stack([np.asarray(row["image"], dtype=np.float32) for row in rows])
    background = [image[mask == 0].std(axis=0).mean() for image, mask in zip(images, masks)]
    return (masks > 0).mean(), float(np.mean(background))


def test_small_cluttered_configuration_has_smaller_objects_on_busier_backgrounds():
    share, spread = _foreground_share_and_background_spread()
    small_share, busy_spread = _foreground_share_and_background_spread(**SYNTHETIC_CONFIGURATIONS["small-cluttered"])

    assert small_share < 0.8 * share  # despite up to four objects instead of three
    assert busy_spread > 1.5 * spread


def test_eight_classes_configuration_uses_all_eight():
    rows = load_wsss_dataset("synthetic", split="train", image_size=48, num_train=40, seed=1,
                             **SYNTHETIC_CONFIGURATIONS["eight-classes"])  # fmt: skip

    assert get_class_names(rows) == list(SYNTHETIC_CLASSES)
    assert {label for labels in rows["labels"] for label in labels} == set(range(8))


@pytest.mark.parametrize("texture_per_class", [True, False])
def test_texture_follows_the_class_unless_shape_only(monkeypatch, texture_per_class):
    """Record which texture each object is drawn with: its class's own, or any of the eight in shape-only mode."""
    import weaktr_hf.data.synthetic as synthetic_module

    drawn, mismatches, textures = [], 0, set()
    original = synthetic_module._texture
    monkeypatch.setattr(synthetic_module, "_texture", lambda kind, *rest: drawn.append(kind) or original(kind, *rest))
    for i in range(12):
        _, _, labels = synthetic_module.render_synthetic_sample(
            np.random.default_rng(i), 48, 48, 4, texture_per_class=texture_per_class
        )
        assert len(drawn) == len(labels)
        mismatches += sorted(drawn) != labels
        textures |= set(drawn)
        drawn.clear()

    if texture_per_class:
        assert mismatches == 0 and textures <= {0, 1, 2, 3}
    else:
        assert mismatches >= 6 and textures - {0, 1, 2, 3}  # textures of classes the set does not even have
