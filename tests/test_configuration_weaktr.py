"""WeakTrConfig: DeiT-S defaults, validation with errors naming the field, save/load round trip."""

import pytest
from transformers import AutoConfig

from weaktr_hf import WeakTrConfig
from weaktr_hf.labels import VOC_CLASSES, foreground_id2label, segmentation_id2label


def test_defaults_are_deit_small():
    config = WeakTrConfig()
    encoder = {
        "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 384, "num_hidden_layers": 12,
        "num_attention_heads": 6, "intermediate_size": 1536, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
        "qkv_bias": True, "drop_path_rate": 0.1,
    }  # fmt: skip
    assert {name: getattr(config, name) for name in encoder} == encoder


def test_voc_layout_gives_twenty_class_tokens():
    config = WeakTrConfig(id2label=foreground_id2label(VOC_CLASSES))
    assert config.num_labels == 20
    assert config.id2label == dict(enumerate(VOC_CLASSES))
    assert config.label2id == {name: i for i, name in enumerate(VOC_CLASSES)}


def test_defaults_of_step_specific_fields_match_released_runs():
    config = WeakTrConfig()
    released = {
        "aaf_reduction": 8, "aaf_feat_reduction": 8, "aaf_pooling": "max", "decoder_hidden_size": 384,
        "decoder_num_hidden_layers": 2, "decoder_num_attention_heads": 6, "decoder_intermediate_size": 1536,
        "decoder_hidden_dropout_prob": 0.1, "use_gradient_clipping": True, "clip_start_value": 1.2,
        "clip_window_size": 120, "loss_average": "all_pixels", "semantic_loss_ignore_index": 255,
    }  # fmt: skip
    assert {name: getattr(config, name) for name in released} == released


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"decoder_hidden_size": 30, "decoder_num_attention_heads": 4}, "decoder_hidden_size"),
        ({"aaf_pooling": "mean"}, "aaf_pooling"),
        ({"loss_average": "sum"}, "loss_average"),
        ({"position_embedding_interpolation": "nearest"}, "position_embedding_interpolation"),
        ({"patch_size": -16}, "patch_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"intermediate_size": -5}, "intermediate_size"),
        ({"clip_window_size": 0}, "clip_window_size"),
        ({"image_size": -224}, "image_size"),
        ({"image_size": (224, 8)}, "image_size"),
        ({"aaf_reduction": 100}, "aaf_reduction"),
        ({"aaf_feat_reduction": 128}, "aaf_feat_reduction"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"clip_start_value": -1.0}, "clip_start_value"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        WeakTrConfig(**kwargs)


def test_num_labels_without_id2label_builds_generic_names():
    config = WeakTrConfig(num_labels=5)
    assert config.num_labels == 5
    assert sorted(config.id2label) == [0, 1, 2, 3, 4]


def test_save_load_round_trip_keeps_fields_and_int_label_keys(tmp_path):
    config = WeakTrConfig(
        image_size=(48, 64), patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, aaf_reduction=2, aaf_feat_reduction=2, aaf_pooling="avg",
        id2label=segmentation_id2label(VOC_CLASSES), loss_average="valid_pixels", clip_window_size=60,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    loaded = WeakTrConfig.from_pretrained(tmp_path)

    assert all(isinstance(key, int) for key in loaded.id2label)
    assert loaded.id2label == config.id2label
    assert loaded.label2id == config.label2id
    assert loaded.image_grid == (6, 8)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_save_load_round_trip_keeps_small_label_counts(tmp_path, num_labels):
    WeakTrConfig(num_labels=num_labels).save_pretrained(tmp_path)
    loaded = WeakTrConfig.from_pretrained(tmp_path)
    assert loaded.num_labels == num_labels
    assert sorted(loaded.id2label) == list(range(num_labels))


def test_auto_config_loads_weaktr_config(tmp_path):
    WeakTrConfig(hidden_size=48, num_attention_heads=3).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, WeakTrConfig)
    assert loaded.hidden_size == 48
    assert loaded.model_type == "weaktr"
