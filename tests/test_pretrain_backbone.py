"""examples/pretrain_backbone.py on a tiny config: deterministic for a seed, resumable, and its output loads as the
demo's `--backbone` (timm layout, safetensors). The committed demo backbone itself is checked for size and fit."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from weaktr_hf import WeakTrConfig, WeakTrForCAM, load_timm_backbone
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_classes", "4", "--image_size", "32", "--hidden_size", "32", "--intermediate_size", "64",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--batch_size", "4", "--max_train_steps", "4",
        "--warmup_steps", "2", "--num_val", "8", "--eval_steps", "2", "--checkpointing_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return load_example("pretrain_backbone.py", "pretrain_backbone")


def test_same_seed_same_weights_other_seed_other_weights(script, tmp_path):
    runs = {name: tmp_path / name for name in ("a", "b", "other")}
    for name, folder in runs.items():
        script.main(["--output_dir", str(folder), "--seed", "1" if name == "other" else "0", *TINY])
    first, again, other = (load_file(folder / "model.safetensors") for folder in runs.values())

    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_output_layout_card_and_loading_as_backbone(script, tmp_path):
    record = script.main(["--output_dir", str(tmp_path), *TINY])

    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "model.safetensors", "pretraining.json"]
    saved = json.loads((tmp_path / "pretraining.json").read_text())
    assert saved["final"] == record["final"] and [entry["step"] for entry in saved["history"]] == [2, 4]
    assert 0.0 <= saved["final"]["image_topk_accuracy"] <= 1.0 and 0.0 <= saved["final"]["patch_accuracy"] <= 1.0
    assert "4 steps of batch 4" in (tmp_path / "README.md").read_text()
    state = load_file(tmp_path / "model.safetensors")
    assert state["pos_embed"].shape == (1, 1 + 16, 32) and state["head.weight"].shape == (4, 32)  # timm names

    config = WeakTrConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, aaf_reduction=2, aaf_feat_reduction=2, num_labels=3)  # fmt: skip
    model = WeakTrForCAM(config)
    report = load_timm_backbone(model, str(tmp_path / "model.safetensors"))
    assert not report.missing_keys
    torch.testing.assert_close(model.weaktr.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_interrupted_run_resumes_to_the_same_weights(script, tmp_path, monkeypatch):
    script.main(["--output_dir", str(tmp_path / "whole"), *TINY])
    original_losses = script.losses
    calls = []

    def crash_after_three_steps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original_losses(*args, **kwargs)

    monkeypatch.setattr(script, "losses", crash_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--output_dir", str(tmp_path / "resumed"), *TINY])
    assert (tmp_path / "resumed" / "pretraining_state.pt").exists()  # saved at step 2
    monkeypatch.setattr(script, "losses", original_losses)
    script.main(["--output_dir", str(tmp_path / "resumed"), *TINY])

    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert not (tmp_path / "resumed" / "pretraining_state.pt").exists()


def test_batches_drawn_by_worker_processes_give_the_same_weights(script, tmp_path):
    record = script.main(["--output_dir", str(tmp_path / "one"), *TINY])
    workers = script.main(["--output_dir", str(tmp_path / "workers"), "--num_workers", "2", *TINY])

    one, other = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "workers"))
    assert all(torch.equal(one[key], other[key]) for key in one)
    assert record["settings"]["device"] == workers["settings"]["device"] == "cpu"
    assert workers["settings"]["num_workers"] == 2
    assert "on cpu with 1 intra-op thread(s)" in (tmp_path / "workers" / "README.md").read_text()


def test_device_and_workers_are_checked(script, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.parse_args([]).device == "cpu"  # auto: the CPU where torch sees no GPU
    for flags, message in ((["--device", "cuda"], "torch sees no GPU here"), (["--device", "tpu9"], "--device 'tpu9'"),
                           (["--num_workers", "-1"], "--num_workers must be at least 0")):  # fmt: skip
        with pytest.raises(SystemExit):
            script.parse_args(flags)
        assert message in capsys.readouterr().err


def test_batches_have_consistent_image_and_patch_targets(script):
    args = script.parse_args(["--num_classes", "6", "--batch_size", "8"])
    clouds = script.make_classes(0, 6)
    pixels, image_labels, patch_targets = script.make_batch(0, 3, clouds, args)

    assert pixels.shape == (8, 3, 64, 64) and patch_targets.shape == (8, 64, 7)
    torch.testing.assert_close(patch_targets.sum(-1), torch.ones(8, 64))  # class fractions of each patch
    present = patch_targets[..., 1:].sum(1) > 0
    assert torch.equal(present.float(), image_labels)
    assert set(image_labels.sum(1).tolist()) <= {1.0, 2.0, 3.0}
    again = script.make_batch(0, 3, clouds, args)
    assert all(torch.equal(a, b) for a, b in zip((pixels, image_labels, patch_targets), again))


def test_contour_batches_have_consistent_targets_and_only_the_outline_tells_the_class(script):
    args = script.parse_args(["--data", "contours", "--num_classes", "6", "--batch_size", "8", "--textured", "1"])
    contours = script.make_classes(0, 6, "contours")
    assert all(c["radius"].shape == (script.CONTOUR_ANGLES,) and c["radius"].max() == 1 for c in contours)
    assert all(c["radius"].min() >= 0.25 and 0 <= c["hole"] < 0.6 for c in contours)
    assert not np.allclose(contours[0]["radius"], contours[1]["radius"])  # classes differ in outline
    pixels, image_labels, patch_targets = script.make_batch(0, 3, contours, args)

    assert pixels.shape == (8, 3, 64, 64) and patch_targets.shape == (8, 64, 7)
    torch.testing.assert_close(patch_targets.sum(-1), torch.ones(8, 64))
    assert torch.equal((patch_targets[..., 1:].sum(1) > 0).float(), image_labels)
    assert set(image_labels.sum(1).tolist()) <= {1.0, 2.0, 3.0}
    again = script.make_batch(0, 3, contours, args)
    assert all(torch.equal(a, b) for a, b in zip((pixels, image_labels, patch_targets), again))
    # One object of one class, not textured: its mask is a plausible part of the image and it has one colour.
    rng = np.random.default_rng(7)
    image, labels = script.render_image(rng, contours[:1], 64, 1, "contours", textured=0.0)
    assert labels.max() == 1 and 0.02 < (labels == 1).mean() < 0.6
    plain = image[labels == 1]
    assert np.ptp(plain, axis=0).max() < 0.4  # one colour (pixel noise 0.03) when not textured


def test_contour_card_names_the_data(script, tmp_path):
    script.main(["--output_dir", str(tmp_path), "--data", "contours", *TINY])
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# Demo backbone: a ViT pre-trained on formula-driven contours")
    assert "--data contours" in card and "IFS" not in card


def test_committed_demo_backbone_is_small_and_fits_the_demo_preset():
    path = ROOT / "src" / "weaktr_hf" / "demo_backbone" / "model.safetensors"
    if not path.exists():
        pytest.fail(f"{path} is missing: run examples/pretrain_backbone.py --output_dir src/weaktr_hf/demo_backbone")
    assert path.stat().st_size < 10 * 2**20
    config = WeakTrConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4, aaf_reduction=2, aaf_feat_reduction=2, num_labels=4)  # fmt: skip
    report = load_timm_backbone(WeakTrForCAM(config), str(path))
    assert not report.missing_keys
    card = json.loads((path.parent / "pretraining.json").read_text())
    settings = card["settings"]
    chance = (1 + settings["max_objects"]) / 2 / settings["num_classes"]  # k of K classes found by random scores
    assert card["final"]["image_topk_accuracy"] > 2 * chance
    assert np.isfinite(card["wall_seconds"])
