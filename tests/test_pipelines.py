"""transformers pipelines on saved WeakTr folders (model + WeakTrImageProcessor), as a user would load them."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, pipeline
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from weaktr_hf import (
    WeakTrForSemanticSegmentation,
    WeakTrImageProcessor,
    inference,
    upsample_logits,
)
from weaktr_hf.data.synthetic import load_synthetic
from weaktr_hf.image_processing_weaktr import evaluation_processor


@pytest.fixture
def saved_segmenter(tester, tmp_path):
    torch.manual_seed(0)
    model = WeakTrForSemanticSegmentation(tester.get_segmentation_config())
    model.save_pretrained(tmp_path)
    WeakTrImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(tmp_path)
    return tmp_path, model


def random_image(height=37, width=50, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def test_auto_image_processor_loads_ours(saved_segmenter):
    folder, _ = saved_segmenter
    assert isinstance(AutoImageProcessor.from_pretrained(folder), WeakTrImageProcessor)


@pytest.mark.parametrize("as_path", [False, True])
def test_image_segmentation_pipeline_returns_one_mask_per_predicted_class(saved_segmenter, tmp_path, as_path):
    folder, model = saved_segmenter
    image = random_image()
    source = image
    if as_path:
        source = str(tmp_path / "image.png")
        image.save(source)
    segments = pipeline("image-segmentation", model=str(folder))(source)

    # The same prediction by hand: processor -> model -> upsample to the image size -> argmax.
    processor = WeakTrImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model.eval()(**processor(image, return_tensors="pt")).logits
    resized = torch.nn.functional.interpolate(logits, size=(37, 50), mode="bilinear", align_corners=False)
    expected = resized.argmax(1)[0]
    labels = {segment["label"] for segment in segments}
    assert labels == {model.config.id2label[int(i)] for i in expected.unique()}
    for segment in segments:
        assert segment["mask"].size == image.size
        class_id = model.config.label2id[segment["label"]]
        np.testing.assert_array_equal(np.array(segment["mask"]) > 0, (expected == class_id).numpy())


def test_padding_processor_and_post_processing_line_up_with_the_model_padding(saved_segmenter):
    """do_pad pads bottom/right to the patch size; post-processing crops it back, like upsample_logits does."""
    folder, model = saved_segmenter
    processor = WeakTrImageProcessor(do_resize=False, do_pad=True, size_divisor=8)
    image = random_image(30, 45)
    inputs = processor(image, return_tensors="pt")
    assert inputs.pixel_values.shape[-2:] == (32, 48)
    with torch.no_grad():
        outputs = model.eval()(**inputs)
        unpadded = model(processor(image, return_tensors="pt", do_pad=False).pixel_values).logits
    prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[(30, 45)])[0]
    expected = upsample_logits(unpadded, (30, 45), 8).argmax(1)[0]
    assert prediction.shape == (30, 45)
    assert torch.equal(prediction, expected)


def test_image_segmentation_pipeline_does_not_call_the_model_unsupported(saved_segmenter):
    """The pipeline's model check reads transformers' name tables; importing weaktr_hf puts the segmenter in them."""
    folder, _ = saved_segmenter
    with CaptureLogger(logging.get_logger("transformers.pipelines.base")) as captured:
        segmenter = pipeline("image-segmentation", model=str(folder))
    assert isinstance(segmenter.model, WeakTrForSemanticSegmentation)
    assert "is not supported" not in captured.out


def test_pipeline_on_a_saved_folder_never_asks_to_run_remote_code(saved_segmenter, monkeypatch):
    """With the package installed nothing prompts; a processor saved with an `auto_map` would make the pipeline ask
    for a video processor's remote code."""
    folder, _ = saved_segmenter
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail(f"the pipeline prompted: {args}"))
    assert isinstance(pipeline("image-segmentation", model=str(folder)).image_processor, WeakTrImageProcessor)


def pipeline_label_map(segmenter, image, label2id):
    """The pipeline's masks as one (H, W) label map."""
    label_map = torch.full((image.height, image.width), -1)
    for segment in segmenter(image):
        label_map[torch.from_numpy(np.array(segment["mask"]) > 0)] = label2id[segment["label"]]
    return label_map


@pytest.mark.parametrize("ensemble", [0.0, 0.8])
def test_pipeline_gives_the_eval_stages_single_scale_prediction(tester, tmp_path, ensemble):
    """With the evaluation processor (resize to the base size, passes below the minimum upsampled, windows) and the
    decoder ensemble in the config, the pipeline's masks are `segment`'s at one scale on the synthetic validation
    images and on drawn 500 x 375 ones: equal without the ensemble, on >= 99% of pixels with it (windows then
    average the ensemble's log-probabilities where `segment` averages each head's logits)."""
    torch.manual_seed(0)
    model = WeakTrForSemanticSegmentation(tester.get_segmentation_config(auxiliary_ensemble_weight=ensemble)).eval()
    model.save_pretrained(tmp_path)
    geometry = {"window_size": 32, "window_stride": 24, "base_size": 40, "min_size": 36}
    evaluation_processor(patch_size=8, **geometry).save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    native = WeakTrImageProcessor(do_resize=False)
    images = list(load_synthetic("val", num_classes=3, image_size=64, num_val=6)["image"])
    images += [random_image(375, 500, seed) for seed in range(3)]
    agree = total = 0
    for image in images:
        expected = inference.segment(model, native(image, return_tensors="pt").pixel_values, **geometry)[0].argmax(0)
        predicted = pipeline_label_map(segmenter, image, model.config.label2id)
        agree, total = agree + (predicted == expected).sum().item(), total + expected.numel()
        if ensemble == 0.0:
            assert torch.equal(predicted, expected)
    assert agree / total >= 0.99
