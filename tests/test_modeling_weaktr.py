"""What both WeakTr models share: position-table interpolation of the encoder, save/load, Auto classes, and the
image-classification pipeline on a saved CAM model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    ViTImageProcessor,
    pipeline,
)

from weaktr_hf import WeakTrConfig, WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrImageProcessor, WeakTrModel
from weaktr_hf.modeling_weaktr import resize_position_embeddings

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------------------------------
# Position-table interpolation
# ---------------------------------------------------------------------------------------------------------------------


def table_as_grid(table, grid):
    return table.reshape(1, *grid, -1).permute(0, 3, 1, 2)


def grid_as_table(grid):
    return grid.permute(0, 2, 3, 1).reshape(1, grid.shape[-2] * grid.shape[-1], -1)


@pytest.mark.parametrize("new_grid", [(3, 5), (6, 4), (7, 7)])
def test_scale_factor_mode_equals_dino_style_bicubic(new_grid):
    table = torch.randn(1, 16, 8)
    rows, cols = new_grid
    expected = F.interpolate(table_as_grid(table, (4, 4)), scale_factor=((rows + 0.1) / 4, (cols + 0.1) / 4),
                             mode="bicubic", align_corners=False)  # fmt: skip
    resized = resize_position_embeddings(table, (4, 4), new_grid, "bicubic_scale_factor")
    torch.testing.assert_close(resized, grid_as_table(expected))


def test_scale_factor_mode_differs_from_target_size_mode():
    table = torch.randn(1, 16, 8)
    by_scale = resize_position_embeddings(table, (4, 4), (3, 5), "bicubic_scale_factor")
    by_size = resize_position_embeddings(table, (4, 4), (3, 5), "bicubic")
    torch.testing.assert_close(by_size, grid_as_table(F.interpolate(table_as_grid(table, (4, 4)), size=(3, 5),
                                                                    mode="bicubic", align_corners=False)))  # fmt: skip
    assert (by_scale - by_size).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["bicubic_scale_factor", "bicubic", "bilinear"])
def test_unchanged_grid_returns_the_table_as_is(mode):
    table = torch.randn(1, 12, 8)
    assert resize_position_embeddings(table, (3, 4), (3, 4), mode) is table


def test_each_model_uses_the_authors_interpolation_at_run_time(tester):
    cam = WeakTrForCAM(tester.get_config())
    segmenter = WeakTrForSemanticSegmentation(tester.get_segmentation_config())
    for model, mode in ((cam, "bicubic_scale_factor"), (segmenter, "bilinear")):
        encoder = model.weaktr
        prefix = encoder.num_prefix_tokens
        torch.testing.assert_close(encoder.interpolate_pos_encoding((4, 4)), encoder.pos_embed)
        expected = resize_position_embeddings(encoder.pos_embed[:, prefix:], (4, 4), (3, 6), mode)
        torch.testing.assert_close(encoder.interpolate_pos_encoding((3, 6))[:, prefix:], expected)
        torch.testing.assert_close(encoder.interpolate_pos_encoding((3, 6))[:, :prefix], encoder.pos_embed[:, :prefix])


def test_config_can_override_the_interpolation(tester):
    model = WeakTrForCAM(tester.get_config(position_embedding_interpolation="bilinear"))
    encoder = model.weaktr
    expected = resize_position_embeddings(encoder.pos_embed[:, 3:], (4, 4), (5, 3), "bilinear")
    torch.testing.assert_close(encoder.interpolate_pos_encoding((5, 3))[:, 3:], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load and Auto classes
# ---------------------------------------------------------------------------------------------------------------------


def saved_model(tmp_path, model_class, config):
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("model_class", [WeakTrForCAM, WeakTrForSemanticSegmentation])
def test_save_and_load_round_trip(tester, tmp_path, model_class):
    config = tester.get_segmentation_config() if model_class is WeakTrForSemanticSegmentation else tester.get_config()
    model = saved_model(tmp_path, model_class, config)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()

    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not loaded.training
    assert all(isinstance(key, int) for key in loaded.config.id2label)
    assert loaded.config.id2label == config.id2label

    pixel_values = tester.prepare_pixel_values(2, 24, 40)
    with torch.no_grad():
        before, after = model(pixel_values), loaded(pixel_values)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


# Loading paths users take; `trust_remote_code=True` without the package is in test_remote_code.py.


@pytest.mark.parametrize("model_class", [WeakTrModel, WeakTrForCAM, WeakTrForSemanticSegmentation])
def test_models_build_on_the_meta_device(tester, model_class):
    """Empty-weights initialisation (accelerate's `init_empty_weights`, `device_map` loading) builds under meta."""
    config = tester.get_config(drop_path_rate=0.1, decoder_drop_path_rate=0.1)
    with torch.device("meta"):
        model = model_class(config)
    assert {param.device.type for param in model.parameters()} == {"meta"}
    assert model.base_model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_from_pretrained_with_device_map_cpu(tester, tmp_path):
    """Big-model loading: the model is built on the meta device, then weights are placed by `device_map`."""
    model = saved_model(tmp_path, WeakTrForSemanticSegmentation, tester.get_segmentation_config())
    loaded = WeakTrForSemanticSegmentation.from_pretrained(tmp_path, device_map="cpu")
    assert {tensor.device.type for tensor in [*loaded.parameters(), *loaded.buffers()]} == {"cpu"}
    pixel_values = tester.prepare_pixel_values(1, 27, 35)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_class", [WeakTrForCAM, WeakTrForSemanticSegmentation])
def test_from_pretrained_in_bfloat16_runs_float32_pixels(tester, tmp_path, model_class):
    config = tester.get_segmentation_config() if model_class is WeakTrForSemanticSegmentation else tester.get_config()
    model = saved_model(tmp_path, model_class, config)
    loaded = model_class.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}
    pixel_values = tester.prepare_pixel_values(2)  # float32, as the image processor gives them
    with torch.no_grad():
        low, full = loaded(pixel_values).logits, model(pixel_values).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.1)


def test_torch_dtype_auto_loads_the_saved_dtype(tester, tmp_path):
    model = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    saved_model(tmp_path / "fp32", WeakTrForSemanticSegmentation, tester.get_segmentation_config())
    for folder, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = WeakTrForSemanticSegmentation.from_pretrained(tmp_path / folder, torch_dtype="auto")
        assert {param.dtype for param in loaded.parameters()} == {dtype}, folder


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    model = WeakTrForSemanticSegmentation(tester.get_segmentation_config(decoder_hidden_dropout_prob=0.0)).train()
    pixel_values, labels = tester.prepare_pixel_values(2), tester.prepare_segmentation_labels(2)

    def gradients():
        model.zero_grad()
        model(pixel_values, labels=labels).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain = gradients()
    # transformers 5.23 renamed gradient_checkpointing_enable (kept as a deprecated alias) to
    # activation_checkpointing_enable; the floor release has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.weaktr.blocks)
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_cam_model_declares_multi_label_problem(tester, tmp_path):
    model = saved_model(tmp_path, WeakTrForCAM, tester.get_config())
    assert model.config.problem_type == "multi_label_classification"
    assert AutoConfig.from_pretrained(tmp_path).problem_type == "multi_label_classification"


def test_auto_classes_resolve_to_weaktr_models(tester, tmp_path):
    saved_model(tmp_path / "cam", WeakTrForCAM, tester.get_config())
    segmenter = saved_model(tmp_path / "seg", WeakTrForSemanticSegmentation, tester.get_segmentation_config())

    assert isinstance(AutoConfig.from_pretrained(tmp_path / "cam"), WeakTrConfig)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "cam")) is WeakTrForCAM
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "seg")) is WeakTrForSemanticSegmentation
    assert type(AutoModel.from_config(tester.get_config())) is WeakTrModel

    encoder = AutoModel.from_pretrained(tmp_path / "seg")  # the step-2 encoder, without the decoder
    assert type(encoder) is WeakTrModel
    for name, value in segmenter.weaktr.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], value, msg=name)


def test_saved_folder_carries_code_for_remote_loading(tester, tmp_path):
    saved_model(tmp_path, WeakTrForCAM, tester.get_config())
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.auto_map["AutoConfig"] == "configuration_weaktr.WeakTrConfig"
    assert config.auto_map["AutoModelForImageClassification"] == "modeling_weaktr.WeakTrForCAM"
    for name in ("configuration_weaktr.py", "modeling_weaktr.py"):
        assert (tmp_path / name).is_file(), name


# ---------------------------------------------------------------------------------------------------------------------
# pipeline("image-classification")
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor_class", [WeakTrImageProcessor, ViTImageProcessor])
def test_image_classification_pipeline_returns_sigmoid_multi_label_scores(tester, tmp_path, processor_class):
    model = WeakTrForCAM(tester.get_config()).eval()
    with torch.no_grad():
        model.weaktr.cls_token.normal_(0.0, 2.0)  # class-token scores spread away from 0
    model.save_pretrained(tmp_path)
    processor = processor_class(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)

    classifier = pipeline("image-classification", model=str(tmp_path))
    assert type(classifier.image_processor) is processor_class
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 56, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=None)

    with torch.no_grad():
        logits = model(processor(image, return_tensors="pt").pixel_values).logits[0]
    expected = {model.config.id2label[i]: score for i, score in enumerate(torch.sigmoid(logits).tolist())}
    assert {prediction["label"] for prediction in predictions} == set(expected)
    for prediction in predictions:
        assert prediction["score"] == pytest.approx(expected[prediction["label"]], abs=1e-5)
    assert abs(sum(prediction["score"] for prediction in predictions) - 1.0) > 0.05  # not a softmax


@pytest.mark.parametrize("model_class", [WeakTrModel, WeakTrForCAM, WeakTrForSemanticSegmentation])
def test_unsupported_masks_and_fixed_position_table_are_refused_not_ignored(tester, model_class):
    config = tester.get_segmentation_config() if model_class is WeakTrForSemanticSegmentation else tester.get_config()
    model = model_class(config).eval()
    pixel_values = tester.prepare_pixel_values(batch_size=1)
    heads = torch.zeros(config.num_hidden_layers, config.num_attention_heads)

    with torch.no_grad():
        with pytest.raises(ValueError, match="does not support head_mask"):
            model(pixel_values, head_mask=heads)
        with pytest.raises(ValueError, match="does not support attention_mask"):
            model(pixel_values, attention_mask=torch.ones(1, 16))
        model(pixel_values, interpolate_pos_encoding=False)  # the training grid needs no resize
        with pytest.raises(ValueError, match="interpolate_pos_encoding=False"):
            model(tester.prepare_pixel_values(batch_size=1, height=48, width=32), interpolate_pos_encoding=False)
        model(pixel_values, num_items_in_batch=4)  # other trainer keywords stay accepted
