"""examples/probe_shape_learning.py on a few generated images: deterministic for a seed, the demo backbone really
loaded into the ViT probe, and clear errors for a checkpoint of another shape or a flag that does not apply."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from weaktr_hf.recipes import DEMO_BACKBONE
from conftest import load_example

TINY = ["--num_train", "32", "--num_val", "8", "--num_train_epochs", "2", "--eval_every", "1"]


@pytest.fixture(scope="module")
def script():
    return load_example("probe_shape_learning.py", "probe_shape_learning")


def test_cnn_probe_history_is_reproducible_and_seed_dependent(script, tmp_path):
    first = script.main(["--model", "cnn", "--output_json", str(tmp_path / "a.json"), *TINY])
    again = script.main(["--model", "cnn", *TINY])
    other = script.main(["--model", "cnn", "--seed", "7", *TINY])

    assert [row["epoch"] for row in first] == [1, 2]
    for row in first:
        assert all(math.isfinite(row[key]) for key in ("train_loss", "val_loss"))
        assert 0 <= row["val_exact_match"] <= row["val_label_accuracy"] <= 1
    strip = [{key: value for key, value in row.items() if key != "seconds"} for row in first]
    assert strip == [{key: value for key, value in row.items() if key != "seconds"} for row in again]
    assert [row["train_loss"] for row in other] != [row["train_loss"] for row in first]
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["settings"]["steps"] == 2 and record["settings"]["learning_rate"] == 1e-3
    assert [row["train_loss"] for row in record["history"]] == [row["train_loss"] for row in first]


def test_vit_probe_starts_from_the_demo_backbone_with_a_new_head(script):
    model, path = script.build_vit(4, "demo")
    weights = load_file(DEMO_BACKBONE)

    assert path == DEMO_BACKBONE
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            assert value.shape[0] == 4
        else:
            assert torch.equal(value, weights[key]), key
    scratch, none = script.build_vit(4, "none")
    assert none is None
    assert not torch.equal(scratch.patch_embed.proj.weight, weights["patch_embed.proj.weight"])
    finer, _ = script.build_vit(4, "none", patch_size=4)
    assert finer.patch_embed.grid_size == (16, 16) and finer(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("stem, convolutions", [("conv", 4), ("cnn", 7)])
def test_vit_probe_with_a_conv_stem_keeps_the_token_grid_and_trains_the_stem(script, stem, convolutions):
    model, path = script.build_vit(4, "none", stem=stem)
    plain, _ = script.build_vit(4, "none")
    pixel_values = torch.randn(2, 3, 64, 64)

    assert path is None and isinstance(model.patch_embed, script.ConvStem)
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in model.patch_embed.modules()) == convolutions
    tokens = model.patch_embed(pixel_values)
    assert tokens.shape == plain.patch_embed(pixel_values).shape == (2, 64, 128)  # 8 x 8 tokens of the demo's width
    loss = model(pixel_values).sum()
    loss.backward()
    assert all(parameter.grad is not None for parameter in model.patch_embed.parameters())
    assert not any(name.startswith("patch_embed.proj") for name in model.state_dict())
    with pytest.raises(ValueError, match="patch_size 4"):
        script.build_vit(4, "none", patch_size=4, stem=stem)


def test_vit_probe_refuses_a_checkpoint_of_another_shape(script, tmp_path):
    weights = load_file(DEMO_BACKBONE)
    weights["pos_embed"] = torch.zeros(1, 17, weights["pos_embed"].shape[-1])  # a 4 x 4 grid, not the demo's 8 x 8
    save_file(weights, tmp_path / "other.safetensors")

    with pytest.raises(ValueError, match="pos_embed"):
        script.build_vit(4, str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        script.build_vit(4, str(tmp_path / "missing.safetensors"))


def test_flags_that_do_not_apply_are_refused(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "cnn", "--backbone", "demo"])
    assert "--backbone, --patch_size and --stem are for --model vit only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "cnn", "--stem", "conv"])
    assert "are for --model vit only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "vit", "--stem", "conv", "--backbone", "demo"])
    assert "--stem conv: the stem makes patch 8 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "vit", "--backbone", "demo", "--patch_size", "4"])
    assert "use --backbone none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "vit", "--patch_size", "5"])
    assert "--patch_size must divide the input size 64, got 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "vit", "--num_train", "8"])
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "vit", "--eval_every", "0"])
    assert "--eval_every must be at least 1" in capsys.readouterr().err
    assert script.parse_args(["--model", "vit"]).learning_rate == 2e-3  # the demo's step-1 peak lr
