import copy
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CAM_CLASSES, WeakTrModelTester

from weaktr_hf import WeakTrForCAM
from weaktr_hf.crf import VOC_PSEUDO_LABEL_CRF, crf_refine_labels
from weaktr_hf.data.schema import wsss_features
from weaktr_hf.image_processing_weaktr import WeakTrImageProcessor
from weaktr_hf.inference import cams_to_labels, generate_cams
from weaktr_hf.pseudo_labels import (
    SETTINGS_FILE,
    evaluate_pseudo_labels,
    pseudo_label_dataset,
    pseudo_label_path,
    write_pseudo_labels,
)
from weaktr_hf.visualization import load_label_png, save_label_png

SETTINGS = {"scales": (1.0, 1.2), "flip": True, "threshold": 0.4, "show_progress": False}


@pytest.fixture(scope="module")
def cam_model():
    """3 foreground classes; a wider init than the default so the CAMs have foreground and background."""
    torch.manual_seed(0)
    return WeakTrForCAM(WeakTrModelTester().get_config(initializer_range=0.2)).eval()


def make_dataset(num_samples=4, with_masks=False):
    """Small coloured images of odd sizes, with 0 to 2 foreground classes each (one image has none)."""
    rng = np.random.default_rng(0)
    rows = {"image": [], "labels": [], "semantic_mask": [], "id": []}
    for index in range(num_samples):
        height, width = 20 + 3 * index, 27 - 2 * index
        rows["image"].append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
        rows["labels"].append([] if index == 2 else sorted({index % 3, (index * 2) % 3}))
        mask = rng.integers(0, 4, (height, width), dtype=np.uint8) if with_masks else None
        rows["semantic_mask"].append(Image.fromarray(mask) if with_masks else None)
        rows["id"].append(f"sample_{index}")
    return datasets.Dataset.from_dict(rows, features=wsss_features(CAM_CLASSES))


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


@pytest.fixture(scope="module")
def reference_dir(cam_model, dataset, tmp_path_factory):
    """Pseudo-labels written by one process in one go."""
    folder = tmp_path_factory.mktemp("reference")
    write_pseudo_labels(cam_model, dataset, folder, **SETTINGS)
    return folder


def read_all(folder, ids):
    return {sample_id: load_label_png(pseudo_label_path(folder, sample_id)) for sample_id in ids}


def test_writes_one_label_png_per_image_from_present_classes(cam_model, dataset, reference_dir):
    expected = sorted(f"{sample_id}.png" for sample_id in dataset["id"]) + [SETTINGS_FILE]
    assert sorted(os.listdir(reference_dir)) == sorted(expected)
    for sample in dataset:
        label_map = load_label_png(pseudo_label_path(reference_dir, sample["id"]))
        assert label_map.shape == (sample["image"].height, sample["image"].width)
        assert set(np.unique(label_map)) <= {0} | {class_id + 1 for class_id in sample["labels"]}
        with Image.open(pseudo_label_path(reference_dir, sample["id"])) as png:
            assert png.mode == "P"
    assert not load_label_png(pseudo_label_path(reference_dir, "sample_2")).any()  # no classes: all background


def test_label_map_equals_thresholded_cams(cam_model, dataset, reference_dir):
    processor = WeakTrImageProcessor(do_resize=False)
    sample = dataset[1]
    pixel_values = processor(sample["image"], return_tensors="pt").pixel_values
    cams = generate_cams(cam_model, pixel_values, [sample["labels"]], scales=(1.0, 1.2), flip=True)
    expected = cams_to_labels(cams, [sample["labels"]], threshold=0.4)[0].numpy()
    assert len(np.unique(expected)) > 1  # the test image really has foreground and background
    np.testing.assert_array_equal(load_label_png(pseudo_label_path(reference_dir, "sample_1")), expected)


def test_restart_skips_finished_images_and_reproduces_the_rest(cam_model, dataset, reference_dir, tmp_path):
    first = write_pseudo_labels(cam_model, dataset.select(range(2)), tmp_path, **SETTINGS)  # an "interrupted" run
    assert first.written == ["sample_0", "sample_1"] and first.skipped == []
    mtimes = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}

    resumed = write_pseudo_labels(cam_model, dataset, tmp_path, **SETTINGS)
    assert resumed.skipped == ["sample_0", "sample_1"]
    assert resumed.written == ["sample_2", "sample_3"]
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in mtimes} == mtimes
    again = write_pseudo_labels(cam_model, dataset, tmp_path, **SETTINGS)
    assert again.written == [] and len(again.skipped) == len(dataset)

    ids = dataset["id"]
    for sample_id in ids:
        with open(pseudo_label_path(tmp_path, sample_id), "rb") as resumed_png:
            with open(pseudo_label_path(reference_dir, sample_id), "rb") as reference_png:
                assert resumed_png.read() == reference_png.read()


def test_shards_write_every_image_exactly_once(cam_model, dataset, reference_dir, tmp_path):
    shards = [
        write_pseudo_labels(cam_model, dataset, tmp_path, process_index=rank, num_processes=2, **SETTINGS)
        for rank in range(2)
    ]
    assert shards[0].written == ["sample_0", "sample_2"]
    assert shards[1].written == ["sample_1", "sample_3"]
    assert sorted(shards[0].written + shards[1].written) == sorted(dataset["id"])
    ids = dataset["id"]
    resumed, reference = read_all(tmp_path, ids), read_all(reference_dir, ids)
    for sample_id in ids:
        np.testing.assert_array_equal(resumed[sample_id], reference[sample_id])
    with pytest.raises(ValueError, match="process_index"):
        write_pseudo_labels(cam_model, dataset, tmp_path, process_index=2, num_processes=2, **SETTINGS)


@pytest.mark.parametrize(
    "change", [{"threshold": 0.6}, {"scales": (1.0,)}, {"flip": False}, {"cam": "coarse_cam"}, {"model": "other"}]
)
def test_rerun_with_other_settings_or_model_refuses_to_mix_labels(cam_model, dataset, tmp_path, change):
    write_pseudo_labels(cam_model, dataset.select([0, 1]), tmp_path, **SETTINGS)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    model = cam_model
    if change.pop("model", None):
        model = copy.deepcopy(cam_model)  # the same model after one more update
        with torch.no_grad():
            model.head.bias.add_(0.01)

    with pytest.raises(ValueError, match="made with other settings"):
        write_pseudo_labels(model, dataset, tmp_path, **{**SETTINGS, **change})

    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    summary = write_pseudo_labels(cam_model, dataset, tmp_path, **SETTINGS)  # the same settings resume
    assert summary.skipped == ["sample_0", "sample_1"] and len(summary.written) == 2


def test_relabelled_images_get_new_pseudo_labels_on_rerun(cam_model, dataset, reference_dir, tmp_path):
    # The labels pick the classes a PNG may hold, so a PNG made from a sample's old labels is stale.
    write_pseudo_labels(cam_model, dataset, tmp_path, **SETTINGS)
    relabelled = dataset.map(lambda row: {"labels": [2] if row["id"] == "sample_1" else row["labels"]})
    assert dataset[1]["labels"] != [2]

    summary = write_pseudo_labels(cam_model, relabelled, tmp_path, **SETTINGS)

    assert summary.written == ["sample_1"] and summary.skipped == ["sample_0", "sample_2", "sample_3"]
    assert set(np.unique(load_label_png(pseudo_label_path(tmp_path, "sample_1")))) <= {0, 3}
    fresh = write_pseudo_labels(cam_model, relabelled.select([1]), tmp_path / "fresh", **SETTINGS)
    assert fresh.written == ["sample_1"]
    assert (tmp_path / "sample_1.png").read_bytes() == (tmp_path / "fresh" / "sample_1.png").read_bytes()
    # A PNG that does not record its labels (written before they were recorded) is made again too.
    save_label_png(
        pseudo_label_path(tmp_path, "sample_0"), load_label_png(pseudo_label_path(reference_dir, "sample_0"))
    )
    assert write_pseudo_labels(cam_model, relabelled, tmp_path, **SETTINGS).written == ["sample_0"]


def test_folder_of_pngs_without_a_settings_record_is_refused(cam_model, dataset, tmp_path):
    save_label_png(pseudo_label_path(tmp_path, "sample_0"), np.zeros((20, 27), np.uint8))
    with pytest.raises(ValueError, match="no record"):
        write_pseudo_labels(cam_model, dataset, tmp_path, **SETTINGS)


def test_uncrf_folder_without_crf_and_class_ids_beyond_8_bits_are_refused(cam_model, dataset, tmp_path):
    with pytest.raises(ValueError, match="needs crf"):
        write_pseudo_labels(cam_model, dataset, tmp_path / "a", uncrf_output_dir=tmp_path / "b", **SETTINGS)
    wide = WeakTrForCAM(WeakTrModelTester().get_config(id2label={i: str(i) for i in range(255)})).eval()
    with pytest.raises(ValueError, match="at most 254 foreground classes"):
        write_pseudo_labels(wide, dataset, tmp_path / "c", **SETTINGS)


def test_crf_refines_over_present_classes_and_maps_back(cam_model, dataset, tmp_path):
    # A weaker unary than VOC's 0.7 so that the CRF visibly changes the map of this noise image.
    crf = dict(VOC_PSEUDO_LABEL_CRF, gt_prob=0.5)
    write_pseudo_labels(cam_model, dataset.select([1, 2]), tmp_path, crf=crf, **SETTINGS)
    sample = dataset[1]
    processor = WeakTrImageProcessor(do_resize=False)
    pixel_values = processor(sample["image"], return_tensors="pt").pixel_values
    cams = generate_cams(cam_model, pixel_values, [sample["labels"]], scales=(1.0, 1.2), flip=True)
    raw = cams_to_labels(cams, [sample["labels"]], threshold=0.4)[0].numpy()
    # sample_1 has classes 1 and 2: labels {0, 2, 3} renumbered {0, 1, 2} for a 3-label CRF, then mapped back.
    assert sample["labels"] == [1, 2]
    compact = np.select([raw == 2, raw == 3], [1, 2], 0)
    refined = crf_refine_labels(np.array(sample["image"]), compact, 3, **crf)
    expected = np.array([0, 2, 3])[refined]
    written = load_label_png(pseudo_label_path(tmp_path, "sample_1"))
    np.testing.assert_array_equal(written, expected)
    assert not np.array_equal(written, raw)  # the CRF changed something
    assert not load_label_png(pseudo_label_path(tmp_path, "sample_2")).any()
    with pytest.raises(ValueError, match="unknown CRF setting.*'sxy'"):
        write_pseudo_labels(cam_model, dataset, tmp_path / "other", crf={"sxy": 3}, **SETTINGS)


def test_pseudo_label_dataset_replaces_masks_and_lists_missing_ids(dataset, reference_dir, tmp_path):
    relabelled = pseudo_label_dataset(dataset, reference_dir)
    assert relabelled.column_names == dataset.column_names
    assert isinstance(relabelled.features["semantic_mask"], datasets.Image)
    for sample in relabelled:
        np.testing.assert_array_equal(
            np.asarray(sample["semantic_mask"]), load_label_png(pseudo_label_path(reference_dir, sample["id"]))
        )
    save_label_png(tmp_path / "sample_0.png", np.zeros((20, 27), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="3 of 4 samples.*'sample_1'.*'sample_3'"):
        pseudo_label_dataset(dataset, tmp_path)


def test_evaluate_pseudo_labels_against_hand_computed_miou(tmp_path):
    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    features = wsss_features(CAM_CLASSES)
    data = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (2, 2))],
            "labels": [[0]],
            "semantic_mask": [Image.fromarray(gt)],
            "id": ["only"],
        },
        features=features,
    )
    save_label_png(tmp_path / "only.png", np.array([[0, 0], [1, 3]], dtype=np.uint8))
    scores = evaluate_pseudo_labels(data, tmp_path, num_labels=4)
    # background: TP 1, GT 1, predicted 2 -> 1/2; class 1: TP 1, GT 2, predicted 1 -> 1/2; classes 2, 3 unseen.
    assert scores["mean_iou"] == pytest.approx(0.5)
    assert scores["overall_accuracy"] == pytest.approx(2 / 3)


def test_evaluate_pseudo_labels_perfect_on_own_labels(reference_dir):
    data = make_dataset(with_masks=True)
    masks = read_all(reference_dir, data["id"])
    data = data.remove_columns("semantic_mask").add_column(
        "semantic_mask",
        [datasets.Image().encode_example(Image.fromarray(masks[sample_id])) for sample_id in data["id"]],
        feature=datasets.Image(),
    )
    assert evaluate_pseudo_labels(data, reference_dir, num_labels=4)["mean_iou"] == pytest.approx(1.0)
