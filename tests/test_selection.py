"""The mask-free choices: Otsu's threshold, the CAM of the most agreeing passes, the held-out classification loss."""

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from weaktr_hf import WeakTrForCAM, WeakTrImageProcessor
from weaktr_hf.inference import generate_cams
from weaktr_hf.selection import (
    choose_cam_without_masks,
    heldout_classification_loss,
    mask_selection_record,
    otsu_threshold,
    threshold_for_cam,
)


def test_otsu_threshold_splits_two_groups_and_says_how_cleanly():
    values = np.concatenate([np.full(60, 0.15), np.full(40, 0.75)])
    threshold, separability = otsu_threshold(values)
    assert 0.15 < threshold < 0.75 and separability > 0.99
    noisy = np.random.default_rng(0).uniform(0, 1, 5000)
    assert otsu_threshold(noisy)[1] < separability
    assert otsu_threshold(np.full(10, 0.3)) == (0.5, 0.0)  # a constant map has no split


def dataset_of(labels, seed=0):
    rng = np.random.default_rng(seed)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)) for _ in labels]
    return datasets.Dataset.from_dict({"image": images, "labels": labels})


def test_mask_free_choice_returns_a_candidate_cam_and_threshold_and_skips_background_only_images(tester):
    model = WeakTrForCAM(tester.get_config()).eval()
    dataset = dataset_of([[0], [], [1, 2]])

    choice = choose_cam_without_masks(model, dataset, scales=(1.0, 1.5), show_progress=False)

    assert choice["num_images"] == 2  # the background-only image carries no CAM
    assert choice["cam"] in ("coarse_cam", "fine_cam", "cross_attention")
    assert choice["threshold"] == choice["per_cam"][choice["cam"]]["threshold"]
    agreements = {name: value["pass_agreement"] for name, value in choice["per_cam"].items()}
    assert all(0.0 <= value <= 1.0 for value in agreements.values())
    assert agreements[choice["cam"]] == max(agreements.values())
    # The threshold is the median of the images' Otsu thresholds of the foreground score (largest present CAM).
    processor = WeakTrImageProcessor(do_resize=False, do_pad=False)
    for cam, value in choice["per_cam"].items():
        found = []
        for example in (dataset[0], dataset[2]):
            pixel_values = processor(example["image"], return_tensors="pt").pixel_values
            maps = generate_cams(model, pixel_values, [example["labels"]], scales=(1.0, 1.5), flip=False, cam=cam)
            found.append(otsu_threshold(maps[0, example["labels"]].amax(0).numpy())[0])
        assert value["threshold"] == pytest.approx(np.median(found)), cam
    with pytest.raises(ValueError, match="no image of the subset has an image-level label"):
        choose_cam_without_masks(model, dataset_of([[], []]), show_progress=False)


def test_a_swept_threshold_is_used_only_for_the_cam_it_was_swept_for(tester):
    scores = {
        "coarse_cam": {"mean_iou": 0.55, "threshold": 0.6, "per_threshold": {0.3: 0.41, 0.6: 0.55}},
        "fine_cam": {"mean_iou": 0.50, "threshold": 0.3, "per_threshold": {0.3: 0.50, 0.6: 0.47}},
    }
    record = mask_selection_record(12, scores, "coarse_cam")
    assert (record["cam"], record["threshold"], record["miou"]) == ("coarse_cam", 0.6, 0.55)
    assert threshold_for_cam(record, "coarse_cam") == 0.6 and threshold_for_cam(record, "fine_cam") == 0.3
    # A record that holds the chosen CAM's threshold only (written before per_cam) keeps it for that CAM alone.
    older = {"epoch": 12, "threshold": 0.6, "cam": "coarse_cam", "miou": 0.55, "per_threshold": {"0.6": 0.55}}
    assert threshold_for_cam(older, "coarse_cam") == 0.6
    with pytest.raises(ValueError, match=r"out/cam_selection\.json holds no threshold chosen for 'fine_cam', only for "
                       r"\['coarse_cam'\]"):  # fmt: skip
        threshold_for_cam(older, "fine_cam", "out/cam_selection.json")
    # The mask-free choice records a threshold for each of its candidates, and for those only.
    model = WeakTrForCAM(tester.get_config()).eval()
    choice = choose_cam_without_masks(model, dataset_of([[0], [1]]), cams=("fine_cam",), show_progress=False)
    assert threshold_for_cam(choice, "fine_cam") == choice["threshold"]
    with pytest.raises(ValueError, match=r"no threshold chosen for 'cross_attention', only for \['fine_cam'\]"):
        threshold_for_cam(choice, "cross_attention")
    with pytest.raises(ValueError, match=r"the chosen CAM 'cross_attention' was not scored"):
        mask_selection_record(12, scores, "cross_attention")


def test_heldout_classification_loss_is_the_mean_soft_margin_loss_at_the_model_size(tester):
    model = WeakTrForCAM(tester.get_config()).eval()
    heldout = dataset_of([[0], [], [1, 2]], seed=1)

    loss = heldout_classification_loss(model, heldout, image_size=32, batch_size=2)

    pixel_values = WeakTrImageProcessor(size={"height": 32, "width": 32})(list(heldout["image"]), return_tensors="pt")
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 1]])
    with torch.no_grad():
        expected = F.multilabel_soft_margin_loss(model(pixel_values=pixel_values.pixel_values).logits, targets)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_evaluation_scores_the_images_that_have_masks_and_predicts_all(tester):
    from weaktr_hf import WeakTrForSemanticSegmentation
    from weaktr_hf.evaluation import evaluate_segmentation

    model = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    rng = np.random.default_rng(2)
    rows = [{"id": f"img{i}", "image": PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)),
             "labels": [0], "semantic_mask": None if i == 1 else PIL.Image.fromarray((rng.random((24, 24)) < 0.5)
                                                                                   .astype(np.uint8))}
            for i in range(3)]  # fmt: skip
    partial = datasets.Dataset.from_list(rows)
    masked = partial.select([0, 2])
    predicted = []

    scores = evaluate_segmentation(model, partial, window_size=16, window_stride=8, skip_unlabelled=True,
                                   on_prediction=lambda i, example, _: predicted.append(example["id"]),
                                   show_progress=False)  # fmt: skip

    assert predicted == ["img0", "img1", "img2"] and scores["num_scored"] == 2
    reference = evaluate_segmentation(model, masked, window_size=16, window_stride=8, show_progress=False)
    assert scores["mean_iou"] == pytest.approx(reference["mean_iou"])
    with pytest.raises(ValueError, match="sample 'img1' has no semantic_mask"):
        evaluate_segmentation(model, partial, window_size=16, window_stride=8, show_progress=False)
    none = evaluate_segmentation(model, partial.select([1]), window_size=16, window_stride=8, skip_unlabelled=True,
                                 show_progress=False)  # fmt: skip
    assert none["num_scored"] == 0 and np.isnan(none["mean_iou"])
