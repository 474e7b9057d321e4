import pytest
import torch
import torch.nn.functional as F

from conftest import WeakTrModelTester

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation
from weaktr_hf.image_processing_weaktr import normalize_cams
from weaktr_hf.inference import cams_to_labels, generate_cams, scaled_input_size, segment
from weaktr_hf.modeling_weaktr import upsample_logits

TESTER = WeakTrModelTester()
PATCH = TESTER.patch_size


@pytest.fixture(scope="module")
def segmenter():
    """Background + 3 classes."""
    torch.manual_seed(0)
    return WeakTrForSemanticSegmentation(TESTER.get_segmentation_config()).eval()


@pytest.fixture(scope="module")
def cam_model():
    """3 foreground classes. A wider init than the default gives CAMs with a real spread (the default's are flat to
    ~1e-6, where the 1e-8 of the min-max normalisation shows)."""
    torch.manual_seed(0)
    return WeakTrForCAM(TESTER.get_config(initializer_range=0.2)).eval()


def plain_probabilities(model, pixel_values):
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    return upsample_logits(logits, pixel_values.shape[-2:], PATCH).softmax(dim=1)


@pytest.mark.parametrize("size", [(24, 40), (21, 30)], ids=["multiple_of_patch", "padded_by_model"])
def test_segment_single_window_equals_plain_forward(segmenter, size):
    pixel_values = torch.randn(2, 3, *size)
    probabilities = segment(segmenter, pixel_values, window_size=48, window_stride=32)
    assert probabilities.shape == (2, 4, *size)
    torch.testing.assert_close(probabilities, plain_probabilities(segmenter, pixel_values))


def test_segment_flip_averages_plain_and_mirrored_pass(segmenter):
    pixel_values = torch.randn(1, 3, 24, 32)
    probabilities = segment(segmenter, pixel_values, window_size=32, window_stride=16, flip=True)
    mirrored = plain_probabilities(segmenter, pixel_values.flip(-1)).flip(-1)
    expected = (plain_probabilities(segmenter, pixel_values) + mirrored) / 2
    torch.testing.assert_close(probabilities, expected)
    assert not torch.allclose(probabilities, plain_probabilities(segmenter, pixel_values))


def test_segment_sliding_windows_average_logits_of_overlaps(segmenter):
    # Width 40 with 24-pixel windows every 16: windows at columns 0..24 and 16..40, overlapping on 16..24.
    pixel_values = torch.randn(2, 3, 24, 40)
    probabilities = segment(segmenter, pixel_values, window_size=24, window_stride=16, batch_size=3)
    with torch.no_grad():
        left = upsample_logits(segmenter(pixel_values=pixel_values[..., :24]).logits, (24, 24), PATCH)
        right = upsample_logits(segmenter(pixel_values=pixel_values[..., 16:]).logits, (24, 24), PATCH)
    logits = torch.zeros(2, 4, 24, 40)
    count = torch.zeros(1, 1, 24, 40)
    logits[..., :24] += left
    logits[..., 16:] += right
    count[..., :24] += 1
    count[..., 16:] += 1
    torch.testing.assert_close(probabilities, (logits / count).softmax(dim=1))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 24, 40))


def test_segment_windows_cover_large_odd_image(segmenter):
    pixel_values = torch.randn(1, 3, 45, 61)
    probabilities = segment(segmenter, pixel_values, window_size=24, window_stride=16, batch_size=4)
    assert probabilities.shape == (1, 4, 45, 61)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(1, 45, 61))
    assert (probabilities > 0).all()


def test_segment_multi_scale_returns_input_size_and_averages_scales(segmenter):
    pixel_values = torch.randn(1, 3, 30, 22)
    probabilities = segment(segmenter, pixel_values, window_size=64, window_stride=32, scales=(1.0, 0.5))
    assert probabilities.shape == (1, 4, 30, 22)
    half = F.interpolate(pixel_values, size=(15, 11), mode="bilinear", align_corners=False)
    with torch.no_grad():
        half_logits = upsample_logits(segmenter(pixel_values=half).logits, (15, 11), PATCH)
    half_probabilities = F.interpolate(half_logits, size=(30, 22), mode="bilinear", align_corners=False).softmax(1)
    expected = (plain_probabilities(segmenter, pixel_values) + half_probabilities) / 2
    torch.testing.assert_close(probabilities, expected)


def test_segment_restores_training_mode_and_needs_no_grad(segmenter):
    segmenter.train()
    try:
        probabilities = segment(segmenter, torch.randn(1, 3, 16, 16), window_size=16, window_stride=8)
        assert segmenter.training
        assert not probabilities.requires_grad
    finally:
        segmenter.eval()


def test_segment_rejects_stride_larger_than_window(segmenter):
    with pytest.raises(ValueError, match="window_stride"):
        segment(segmenter, torch.randn(1, 3, 16, 16), window_size=16, window_stride=24)


def test_generate_cams_single_pass_equals_hand_computation(cam_model):
    pixel_values = torch.randn(1, 3, 32, 40)
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    cams = generate_cams(cam_model, pixel_values, labels, scales=(1.0,), flip=False)
    with torch.no_grad():
        fine = cam_model(pixel_values=pixel_values).fine_cam
    upsampled = F.interpolate(fine, size=(32, 40), mode="bilinear", align_corners=False) * labels[..., None, None]
    flat = upsampled.flatten(2)
    low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    expected = (upsampled - low) / (high - low + 1e-8) * labels[..., None, None]
    torch.testing.assert_close(cams, expected)


def test_generate_cams_zero_absent_and_normalise_present_classes(cam_model):
    pixel_values = torch.randn(1, 3, 30, 37)
    cams = generate_cams(cam_model, pixel_values, [[0, 2]], scales=(1.0, 1.2), flip=True)
    assert cams.shape == (1, 3, 30, 37)
    assert torch.equal(cams[0, 1], torch.zeros(30, 37))
    for class_id in (0, 2):
        assert cams[0, class_id].min().item() == 0.0
        assert cams[0, class_id].max().item() == pytest.approx(1.0, abs=1e-5)


def test_generate_cams_flip_sums_mirrored_pass_before_normalising(cam_model):
    pixel_values = torch.randn(1, 3, 24, 32)
    labels = torch.tensor([[0.0, 1.0, 1.0]])
    cams = generate_cams(cam_model, pixel_values, labels, scales=(1.0,), flip=True)
    with torch.no_grad():
        plain = cam_model(pixel_values=pixel_values).fine_cam
        mirrored = cam_model(pixel_values=pixel_values.flip(-1)).fine_cam.flip(-1)
    total = F.interpolate(plain, size=(24, 32), mode="bilinear", align_corners=False) + F.interpolate(
        mirrored, size=(24, 32), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(cams, normalize_cams(total, labels))


def test_generate_cams_runs_each_scale_at_whole_patches_with_flips(cam_model):
    sizes = []
    hook = cam_model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["pixel_values"].shape[-2:])), with_kwargs=True
    )
    try:
        generate_cams(cam_model, torch.randn(1, 3, 30, 37), [[1]], scales=(1.0, 1.2), flip=True)
    finally:
        hook.remove()
    # 1.0: 30 -> 32, 37 -> 40; 1.2: 36 -> 40 (halves up), 44 -> 48.
    assert sizes == [(32, 40), (32, 40), (40, 48), (40, 48)]
    assert scaled_input_size((3, 3), 0.5, PATCH) == (PATCH, PATCH)


def test_generate_cams_batch_and_coarse_cam(cam_model):
    pixel_values = torch.randn(2, 3, 16, 24)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    cams = generate_cams(cam_model, pixel_values, labels, scales=(1.0, 0.8), flip=False, cam="coarse_cam")
    assert cams.shape == (2, 3, 16, 24)
    assert (cams >= 0).all() and (cams <= 1).all()
    assert torch.equal(cams[0, 1:], torch.zeros(2, 16, 24))
    assert torch.equal(cams[1, 0], torch.zeros(16, 24))
    with pytest.raises(ValueError, match="cam must be one of"):
        generate_cams(cam_model, pixel_values, labels, cam="attention")
    with pytest.raises(ValueError, match="labels"):
        generate_cams(cam_model, pixel_values, torch.ones(2, 4))


def test_cams_to_labels_background_threshold_and_absent_classes():
    cams = torch.tensor(
        [[[[0.9, 0.2, 0.5]], [[0.1, 0.3, 0.6]], [[0.0, 0.0, 0.0]]]]
    )  # (1, 3 classes, 1, 3)
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    label_map = cams_to_labels(cams, labels, threshold=0.4)
    assert label_map.dtype == torch.int64
    assert label_map.tolist() == [[[1, 0, 2]]]
    # With a zero threshold an absent class (all zeros) still never wins: ties go to background.
    assert cams_to_labels(torch.zeros(1, 3, 1, 2), [[]], threshold=0.0).tolist() == [[[0, 0]]]


def test_generate_cams_for_several_names_equals_one_call_per_name(tester):
    torch.manual_seed(0)
    model = WeakTrForCAM(tester.get_config())
    pixel_values = tester.prepare_pixel_values(batch_size=1, height=30, width=37)
    names = ("coarse_cam", "fine_cam", "cross_attention")
    together = generate_cams(model, pixel_values, [[0, 2]], scales=(1.0, 1.2), flip=True, cam=names)
    assert set(together) == set(names)
    for name in names:
        alone = generate_cams(model, pixel_values, [[0, 2]], scales=(1.0, 1.2), flip=True, cam=name)
        torch.testing.assert_close(together[name], alone, rtol=0, atol=0)


@pytest.mark.parametrize("cam", ["coarse_cam", "fine_cam"])
def test_post_process_cams_equals_single_pass_generate_cams(cam_model, cam):
    from weaktr_hf.image_processing_weaktr import WeakTrImageProcessor

    processor = WeakTrImageProcessor(do_resize=False, size_divisor=8)
    pixel_values = processor(torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8), return_tensors="pt").pixel_values
    labels = [[0, 1, 2]]
    with torch.no_grad():
        outputs = cam_model(pixel_values=pixel_values)
    assert getattr(outputs, cam).min() < 0 or cam == "fine_cam"  # the coarse CAM has negative values to ReLU

    (post_processed,) = processor.post_process_cams(outputs, labels, target_sizes=[(32, 48)], cam=cam)
    generated = cams_to_labels(generate_cams(cam_model, pixel_values, labels, scales=(1.0,), flip=False, cam=cam),
                               labels, 0.43)[0]  # fmt: skip

    torch.testing.assert_close(post_processed, generated.cpu())
