"""Tests of WeakTrImageProcessor: input modes, segmentation maps, padding, post-processing and CAM pseudo-labels."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from packaging import version
from PIL import Image
from transformers import AutoImageProcessor

from weaktr_hf.configuration_weaktr import WeakTrConfig
from weaktr_hf.image_processing_weaktr import (
    WeakTrImageProcessor,
    cams_to_label_map,
    normalize_cams,
    reduce_labels,
)

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def unnormalized(**kwargs):
    """A processor that only converts and rescales, so pixel values are intensities in [0, 1]."""
    return WeakTrImageProcessor(do_resize=False, do_normalize=False, **kwargs)


def pixels(processor, images, **kwargs):
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


# ----------------------------------------------------------------------------------------------- image modes


def test_default_processing_resizes_rescales_and_normalizes_rgb():
    image = Image.new("RGB", (40, 30), (255, 128, 0))
    values = pixels(WeakTrImageProcessor(), image)
    assert values.shape == (1, 3, 224, 224) and values.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255 - MEAN) / STD
    torch.testing.assert_close(values[0, :, 100, 100], expected)


def test_grey_image_is_repeated_to_three_channels():
    values = pixels(unnormalized(), Image.new("L", (5, 4), 51))
    assert values.shape == (1, 3, 4, 5)
    torch.testing.assert_close(values, torch.full_like(values, 51 / 255))


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (200, 0, 0, 0))  # fully transparent -> white
    image.putpixel((1, 0), (200, 0, 0, 255))  # opaque -> unchanged
    values = pixels(unnormalized(), image)[0]
    torch.testing.assert_close(values[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(values[:, 0, 1], torch.tensor([200 / 255, 0.0, 0.0]))


def test_sixteen_bit_image_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[65535, 32896, 0]], dtype=np.uint16))
    values = pixels(unnormalized(), image)[0, 0, 0]
    torch.testing.assert_close(values, torch.tensor([1.0, 32896 / 65535, 0.0]))


def test_sixteen_bit_mode_i_and_uint16_arrays_match_i16():
    raw = np.array([[65535, 1000], [257, 0]], dtype=np.uint16)
    reference = pixels(unnormalized(), Image.fromarray(raw))
    from_mode_i = pixels(unnormalized(), Image.fromarray(raw.astype(np.int32)))
    from_array = pixels(unnormalized(), raw)
    torch.testing.assert_close(from_mode_i, reference)
    torch.testing.assert_close(from_array, reference)
    torch.testing.assert_close(reference[0, :, 1, 0], torch.full((3,), 1 / 255))


def test_sixteen_bit_png_file_keeps_its_depth(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16)).save(path)
    torch.testing.assert_close(pixels(unnormalized(), str(path)), torch.ones(1, 3, 3, 4))


def test_palette_image_uses_its_palette_colours():
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    values = pixels(unnormalized(), image)[0, :, 0, 0]
    torch.testing.assert_close(values, torch.tensor([10, 20, 30]) / 255)


def test_cmyk_and_float_modes():
    cmyk = pixels(unnormalized(), Image.new("CMYK", (2, 2), (0, 0, 0, 0)))
    torch.testing.assert_close(cmyk, torch.ones_like(cmyk))
    float_image = Image.fromarray(np.full((2, 2), 0.25, dtype=np.float32))
    values = pixels(unnormalized(), float_image)
    torch.testing.assert_close(values, torch.full_like(values, 0.25))


def test_array_layouts_agree():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    torch.testing.assert_close(pixels(unnormalized(), hwc), pixels(unnormalized(), chw))
    torch.testing.assert_close(pixels(unnormalized(), hwc), pixels(unnormalized(), Image.fromarray(hwc)))
    grey = hwc[..., 0]
    torch.testing.assert_close(pixels(unnormalized(), grey), pixels(unnormalized(), Image.fromarray(grey)))


def test_shortest_edge_keeps_aspect_ratio():
    values = pixels(WeakTrImageProcessor(size={"shortest_edge": 32}), Image.new("RGB", (100, 50)))
    assert values.shape == (1, 3, 32, 64)


# ------------------------------------------------------------------------------------------ segmentation maps


def test_segmentation_maps_use_nearest_and_return_int64_labels():
    rng = np.random.default_rng(0)
    label_map = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), size=(9, 13))
    processor = WeakTrImageProcessor(size={"height": 23, "width": 17})
    out = processor(
        [Image.new("RGB", (13, 9)), Image.new("RGB", (13, 9))],
        segmentation_maps=[Image.fromarray(label_map), label_map],
        return_tensors="pt",
    )
    labels = out["labels"]
    assert labels.shape == (2, 23, 17) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 3, 7, 255}
    torch.testing.assert_close(labels[0], labels[1])


def test_segmentation_map_upsampling_repeats_cells():
    label_map = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    processor = WeakTrImageProcessor(size={"height": 4, "width": 4})
    labels = processor(Image.new("RGB", (2, 2)), segmentation_maps=label_map, return_tensors="pt")["labels"][0]
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    torch.testing.assert_close(labels, expected)


def test_reduce_labels_maps_background_to_ignore():
    label_map = np.array([[0, 1, 2, 255]], dtype=np.uint8)
    processor = WeakTrImageProcessor(do_resize=False, do_reduce_labels=True)
    labels = processor(Image.new("RGB", (4, 1)), segmentation_maps=label_map, return_tensors="pt")["labels"]
    torch.testing.assert_close(labels, torch.tensor([[[255, 0, 1, 255]]]))
    torch.testing.assert_close(reduce_labels(torch.tensor([0, 5, 255])), torch.tensor([255, 4, 255]))


def test_padding_is_bottom_right_to_a_multiple_of_size_divisor():
    processor = WeakTrImageProcessor(size={"shortest_edge": 20}, do_pad=True, size_divisor=16)
    images = [Image.new("RGB", (40, 20), (255, 255, 255)), Image.new("RGB", (20, 30), (255, 255, 255))]
    maps = [np.ones((20, 40), dtype=np.uint8), np.ones((30, 20), dtype=np.uint8)]
    out = processor(images, segmentation_maps=maps, return_tensors="pt")
    # Resized to 20x40 and 30x20; padded together to 32x48.
    assert out["pixel_values"].shape == (2, 3, 32, 48)
    first, second = out["pixel_values"]
    assert (first[:, :20, :40] > 0).all() and (first[:, 20:] == 0).all() and (first[:, :, 40:] == 0).all()
    assert (second[:, :30, :20] > 0).all() and (second[:, 30:] == 0).all() and (second[:, :, 20:] == 0).all()
    labels = out["labels"]
    assert (labels[0, :20, :40] == 1).all() and (labels[0, 20:] == 255).all() and (labels[0, :, 40:] == 255).all()


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_images_raise_with_their_index():
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    processor = WeakTrImageProcessor()
    with pytest.raises(ValueError, match=r"image 1 has shape \(8, 8, 2\).*1, 3 or 4 channels"):
        processor([good, np.zeros((8, 8, 2), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"image 0 has 5 channels"):
        processor(np.zeros((5, 8, 3), dtype=np.uint8), input_data_format="channels_first")
    with pytest.raises(ValueError, match=r"image 0 has dtype torch.int32"):
        processor(np.zeros((8, 8, 3), dtype=np.int32))
    with pytest.raises(ValueError, match=r"image 0: mode 'F' image has values in \[0, 2\]"):
        processor(Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_single_map_with_a_channel_axis_is_one_map(as_tensor):
    label_map = np.random.default_rng(0).integers(0, 4, (30, 50, 1), dtype=np.uint8)
    maps = torch.from_numpy(label_map) if as_tensor else label_map
    image = np.zeros((30, 50, 3), dtype=np.uint8)

    labels = WeakTrImageProcessor(do_resize=False)(image, segmentation_maps=maps, return_tensors="pt")["labels"]

    torch.testing.assert_close(labels, torch.from_numpy(label_map[None, ..., 0]).long())


def test_bad_segmentation_maps_raise_with_their_index():
    processor = WeakTrImageProcessor()
    images = [Image.new("RGB", (9, 8)), Image.new("RGB", (8, 9))]
    with pytest.raises(ValueError, match=r"segmentation map 1 is \(8, 9\).*image 1 is \(9, 8\)"):
        processor(images, segmentation_maps=[np.zeros((8, 9)), np.zeros((8, 9))])
    with pytest.raises(ValueError, match=r"2 images but 1 segmentation maps"):
        processor(images, segmentation_maps=[np.zeros((8, 9))])
    with pytest.raises(ValueError, match=r"segmentation map 0 has mode 'RGB'"):
        processor(images[:1], segmentation_maps=[Image.new("RGB", (9, 8))])


def test_unstackable_sizes_raise_with_a_remedy():
    processor = WeakTrImageProcessor(size={"shortest_edge": 16})
    images = [Image.new("RGB", (32, 16)), Image.new("RGB", (16, 32))]
    with pytest.raises(ValueError, match="do_pad=True"):
        processor(images, return_tensors="pt")
    assert [tuple(v.shape) for v in processor(images)["pixel_values"]] == [(3, 16, 32), (3, 32, 16)]


# ---------------------------------------------------------------------------------------- post-processing


def step_logits(num_columns: int, step_at: int) -> torch.Tensor:
    """(1, 2, 5, num_columns) logits: class 0 left of column `step_at`, class 1 from it on."""
    logits = torch.zeros(1, 2, 5, num_columns)
    logits[0, 0, :, :step_at] = 1.0
    logits[0, 1, :, step_at:] = 1.0
    return logits


def test_semantic_segmentation_without_target_sizes_is_argmax_at_logit_resolution():
    logits = torch.randn(2, 4, 3, 5)
    maps = WeakTrImageProcessor().post_process_semantic_segmentation(SimpleNamespace(logits=logits))
    assert len(maps) == 2 and maps[0].dtype == torch.int64 and maps[0].device.type == "cpu"
    torch.testing.assert_close(maps[1], logits[1].argmax(0))


def test_semantic_segmentation_with_target_sizes_upsamples_bilinearly():
    processor = WeakTrImageProcessor(size={"height": 16, "width": 32}, size_divisor=4)  # logits 4x8 cover 16x32
    logits = step_logits(8, 4)[:, :, :4]
    for target_sizes in ([(30, 50)], torch.tensor([[30, 50]])):
        (label_map,) = processor.post_process_semantic_segmentation(SimpleNamespace(logits=logits), target_sizes)
        assert label_map.shape == (30, 50) and label_map.dtype == torch.int64
        assert (label_map[:, :25] == 0).all() and (label_map[:, 25:] == 1).all()


def test_post_processing_crops_padding_before_resizing():
    # Image 18x38, size_divisor 4: the padded input is 20x40, the logits 5x10 cells of 4 pixels. The class changes
    # at cell 5 = pixel 20 of the input; stretching all 10 cells over 38 pixels would move it to pixel 19.
    processor = WeakTrImageProcessor(do_resize=False, do_pad=True, size_divisor=4)
    assert processor(np.zeros((18, 38, 3), dtype=np.uint8), return_tensors="pt")["pixel_values"].shape[-2:] == (20, 40)
    (label_map,) = processor.post_process_semantic_segmentation(SimpleNamespace(logits=step_logits(10, 5)), [(18, 38)])
    assert label_map.shape == (18, 38)
    assert (label_map[:, :20] == 0).all() and (label_map[:, 20:] == 1).all()


def test_post_processing_crops_padding_of_resized_images():
    # Original 36x76 -> shortest edge 18 -> 18x38 -> padded 20x40; the step at resized pixel 20 is original pixel 40.
    processor = WeakTrImageProcessor(size={"shortest_edge": 18}, do_pad=True, size_divisor=4)
    (label_map,) = processor.post_process_semantic_segmentation(SimpleNamespace(logits=step_logits(10, 5)), [(36, 76)])
    assert label_map.shape == (36, 76)
    assert (label_map[:, :40] == 0).all() and (label_map[:, 40:] == 1).all()


def band_logits(pixel_values, patch_size, num_classes=3):
    """Logits of a patch model whose class is the column band (left / middle / right third) of the whole input."""
    height, width = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
    band = torch.arange(width) * num_classes // width
    return torch.nn.functional.one_hot(band, num_classes).T[None, :, None, :].expand(1, -1, height, -1).float()


def test_post_processing_honours_the_size_given_to_preprocessing():
    processor = WeakTrImageProcessor(size={"height": 32, "width": 32}, size_divisor=8, do_pad=True)
    image = torch.randint(0, 255, (3, 48, 80), dtype=torch.uint8)
    for overrides in ({"size": {"shortest_edge": 48}}, {"do_resize": False}):
        logits = band_logits(processor(image, return_tensors="pt", **overrides).pixel_values, 8)

        (label_map,) = processor.post_process_semantic_segmentation(
            SimpleNamespace(logits=logits), [(48, 80)], **overrides
        )

        counts = torch.bincount(label_map.flatten(), minlength=3) / label_map.numel()
        expected = logits[0, :, 0].sum(-1) / logits.shape[-1]  # each band's share of the columns
        torch.testing.assert_close(counts, expected, atol=0.03, rtol=0)
        assert (label_map[:, :20] == 0).all() and (label_map[:, -20:] == 2).all()


def test_post_processing_refuses_maps_that_cannot_come_from_the_target_size():
    image = torch.randint(0, 255, (3, 48, 80), dtype=torch.uint8)
    processor = WeakTrImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    logits = band_logits(processor(image, size={"shortest_edge": 48}, return_tensors="pt").pixel_values, 8)
    with pytest.raises(ValueError, match="Pass post-processing the size / do_resize / do_pad"):
        processor.post_process_semantic_segmentation(SimpleNamespace(logits=logits), [(48, 80)])
    # a processor whose size_divisor is not the model's patch size (8-px patches, divisor 16)
    cams = band_logits(torch.zeros(1, 3, 32, 32), 8)
    with pytest.raises(ValueError, match="size_divisor=model.config.patch_size"):
        WeakTrImageProcessor(size={"height": 32, "width": 32}).post_process_cams(
            SimpleNamespace(fine_cam=cams), [[0, 1, 2]], [(100, 100)]
        )
    (label_map,) = WeakTrImageProcessor(size={"height": 32, "width": 32}).post_process_cams(
        SimpleNamespace(fine_cam=cams), [[0, 1, 2]], [(100, 100)], size_divisor=8
    )
    assert (label_map[:, :40] == 1).all() and (label_map[:, -15:] == 3).all()


def test_saved_beside_a_model_the_processor_file_gets_the_model_patch_size(tmp_path, caplog):
    WeakTrConfig(patch_size=8, image_size=32).save_pretrained(tmp_path)
    processor = WeakTrImageProcessor(size={"height": 32, "width": 32})  # size_divisor 16

    with caplog.at_level("WARNING"):
        processor.save_pretrained(tmp_path)

    assert processor.size_divisor == 16  # the caller's object is left as it is
    with open(tmp_path / "preprocessor_config.json") as file:
        assert json.load(file)["size_divisor"] == 8
    assert "saving a processor with size_divisor 16 beside a model with patch_size 8" in caplog.text
    assert AutoImageProcessor.from_pretrained(tmp_path).size_divisor == 8


def test_a_folder_whose_processor_disagrees_with_its_model_is_fixed_up_on_loading(tmp_path, caplog):
    """A folder written elsewhere (by hand, or by an older release) with size_divisor 16 beside a patch-8 model."""
    WeakTrConfig(patch_size=8, image_size=32).save_pretrained(tmp_path)
    WeakTrImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(tmp_path)
    processor_file = tmp_path / "preprocessor_config.json"
    settings = json.loads(processor_file.read_text())
    processor_file.write_text(json.dumps({**settings, "size_divisor": 16}))

    with caplog.at_level("WARNING"):
        loaded = WeakTrImageProcessor.from_pretrained(tmp_path)
        auto = AutoImageProcessor.from_pretrained(tmp_path)

    assert loaded.size_divisor == 8
    assert "has size_divisor 16 but the model saved with it has patch_size 8" in caplog.text
    assert WeakTrImageProcessor.from_pretrained(tmp_path, size_divisor=4).size_divisor == 4
    if version.parse(transformers.__version__) < version.parse("5.25.0"):
        assert auto.size_divisor == 8  # the Auto class loads through WeakTrImageProcessor.from_pretrained
    else:  # the Auto class builds from the saved settings alone: no fix-up, and post-processing says what is wrong
        assert auto.size_divisor == 16
        with pytest.raises(ValueError, match="size_divisor=model.config.patch_size"):
            auto.post_process_semantic_segmentation(SimpleNamespace(logits=torch.zeros(1, 2, 4, 4)), [(32, 32)])


def test_target_sizes_must_match_the_batch():
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        WeakTrImageProcessor().post_process_semantic_segmentation(
            SimpleNamespace(logits=torch.zeros(1, 2, 3, 3)), [(4, 4), (4, 4)]
        )


# ----------------------------------------------------------------------------------------------------- CAMs


def test_normalize_cams_min_max_per_present_class_and_zeroes_absent():
    cams = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[7.0, 8.0], [9.0, 10.0]], [[2.0, 2.0], [2.0, 2.0]]])
    present = torch.tensor([True, False, True])
    normalized = normalize_cams(cams, present)
    torch.testing.assert_close(normalized[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert (normalized[1] == 0).all()  # absent
    assert (normalized[2] == 0).all()  # flat map
    batched = normalize_cams(cams.expand(2, -1, -1, -1), torch.stack([present, ~present]))
    torch.testing.assert_close(batched[0], normalized)
    assert (batched[1, 0] == 0).all() and torch.isclose(batched[1, 1].max(), torch.tensor(1.0))


def test_cams_to_label_map_prepends_threshold_and_ignores_absent_classes():
    cams = torch.tensor([[[0.9, 0.2]], [[5.0, 5.0]]])
    label_map = cams_to_label_map(cams, torch.tensor([True, False]), threshold=0.0)
    torch.testing.assert_close(label_map, torch.tensor([[1, 1]]))  # absent class 1 never wins, whatever its score
    torch.testing.assert_close(cams_to_label_map(cams, torch.tensor([1, 0]), threshold=0.5), torch.tensor([[1, 0]]))


def hand_built_cams() -> SimpleNamespace:
    """One image, 3 classes on a 2x2 grid; class 1 is absent from the labels but has the largest CAM."""
    fine_cam = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[50.0, 50.0], [50.0, 60.0]], [[8.0, -5.0], [0.0, 0.0]]]])
    return SimpleNamespace(fine_cam=fine_cam, coarse_cam=None, cross_attention=None)


def test_post_process_cams_gives_the_pseudo_label_map():
    # Class 0 -> [[0, .25], [.5, 1]]; class 2 after ReLU -> [[1, 0], [0, 0]]; class 1 zeroed.
    processor = WeakTrImageProcessor()
    (label_map,) = processor.post_process_cams(hand_built_cams(), labels=torch.tensor([[1, 0, 1]]))
    torch.testing.assert_close(label_map, torch.tensor([[3, 0], [1, 1]]))
    (as_ids,) = processor.post_process_cams(hand_built_cams(), labels=[[0, 2]])
    torch.testing.assert_close(as_ids, label_map)
    (higher,) = processor.post_process_cams(hand_built_cams(), labels=[[0, 2]], threshold=0.6)
    torch.testing.assert_close(higher, torch.tensor([[3, 0], [0, 1]]))


def test_post_process_cams_upsamples_to_target_size():
    processor = WeakTrImageProcessor(do_resize=False, size_divisor=2)  # the 2x2 grid covers a 4x4 image
    (label_map,) = processor.post_process_cams(hand_built_cams(), labels=[[0, 2]], target_sizes=[(4, 4)])
    assert label_map.shape == (4, 4) and label_map.dtype == torch.int64
    assert [label_map[0, 0], label_map[0, 3], label_map[3, 0], label_map[3, 3]] == [3, 0, 1, 1]
    assert 2 not in label_map.unique().tolist()


def test_post_process_cams_rejects_bad_arguments():
    processor = WeakTrImageProcessor()
    with pytest.raises(ValueError, match="image 0 has class id 3"):
        processor.post_process_cams(hand_built_cams(), labels=[[3]])
    with pytest.raises(ValueError, match=r"multi-hot \(1, 3\)"):
        processor.post_process_cams(hand_built_cams(), labels=torch.ones(1, 4))
    with pytest.raises(ValueError, match="outputs have no 'coarse_cam'"):
        processor.post_process_cams(hand_built_cams(), labels=[[0]], cam="coarse_cam")
    with pytest.raises(ValueError, match="cam must be one of"):
        processor.post_process_cams(hand_built_cams(), labels=[[0]], cam="logits")


# ------------------------------------------------------------------------------------------------ saving


def test_save_and_load_round_trip(tmp_path):
    processor = WeakTrImageProcessor(
        size={"shortest_edge": 48}, do_pad=True, size_divisor=8, do_reduce_labels=True, image_mean=[0.5, 0.5, 0.5]
    )
    processor.save_pretrained(tmp_path)
    loaded = WeakTrImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.size_divisor == 8 and loaded.do_pad and loaded.do_reduce_labels

    # The call the package makes on import; repeated here so the test does not depend on it.
    AutoImageProcessor.register(
        WeakTrConfig, image_processor_classes={"torchvision": WeakTrImageProcessor}, exist_ok=True
    )
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto) is WeakTrImageProcessor and auto.to_dict() == processor.to_dict()

    image, label_map = Image.new("RGB", (50, 30), (10, 200, 30)), np.full((30, 50), 2, dtype=np.uint8)
    original = processor(image, segmentation_maps=label_map, return_tensors="pt")
    reloaded = auto(image, segmentation_maps=label_map, return_tensors="pt")
    torch.testing.assert_close(reloaded["pixel_values"], original["pixel_values"])
    torch.testing.assert_close(reloaded["labels"], original["labels"])
    assert original["pixel_values"].shape == (1, 3, 48, 80) and set(original["labels"].unique().tolist()) == {1}
