"""Shared test helpers: tiny WeakTr configs and inputs, so each model test runs in a fraction of a second."""

import importlib.util
import os
import site
import sys
from pathlib import Path

import pytest
import torch

from weaktr_hf import WeakTrConfig
from weaktr_hf.labels import foreground_id2label, segmentation_id2label

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def import_path_without_weaktr():
    """The parent's import path minus the current directory, `src` checkouts, editable-install hooks, and Hugging
    Face module caches (another cache's `transformers_modules` would shadow the subprocess's own)."""
    kept = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry) or "__editable__" in entry:
            continue
        if os.path.isdir(os.path.join(entry, "transformers_modules")):
            continue
        if os.path.isdir(os.path.join(entry, "weaktr_hf")) and entry not in site.getsitepackages():
            continue
        kept.append(os.path.abspath(entry))
    return kept


def load_example(file_name, module_name):
    """Imports a script of examples/ as a module, so tests call its functions (main, argument parsing) directly."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES_DIR / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_api():
    """The recipe's names (weaktr_hf.train: parse_args, main; weaktr_hf.recipes: presets, batch sizes;
    weaktr_hf.stages: data, subsets, figures) as one namespace, the way the recipe tests call them."""
    import types

    from weaktr_hf import recipes, stages, train

    return types.SimpleNamespace(**{**vars(stages), **vars(recipes), **vars(train)})


CAM_CLASSES = ("cat", "dog", "bird")
NUM_CAM_LABELS = len(CAM_CLASSES)


class WeakTrModelTester:
    """Builds tiny configs and matching inputs for both WeakTr models.

    The encoder has patch 8, width 32, 2 layers of 4 heads (K = 8 attention maps, head dim 8) and is built for
    32 x 32 inputs (a 4 x 4 grid); the decoder is 32 wide with 2 layers. Drop-path is off so that outputs are
    deterministic in training mode too.
    """

    image_size = 32
    patch_size = 8
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4

    def get_config(self, **overrides):
        """Step-1 config: one class token per name of `CAM_CLASSES`."""
        kwargs = {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": 4 * self.hidden_size,
            "drop_path_rate": 0.0,
            "aaf_reduction": 2,  # K = 8 maps -> 4
            "aaf_feat_reduction": 2,  # head dim 8 -> 4
            "decoder_hidden_size": 32,
            "decoder_num_hidden_layers": 2,
            "decoder_num_attention_heads": 4,
            "decoder_intermediate_size": 64,
            "id2label": foreground_id2label(CAM_CLASSES),
        }
        return WeakTrConfig(**{**kwargs, **overrides})

    def get_segmentation_config(self, **overrides):
        """Step-2 config: background (label 0) plus `CAM_CLASSES`."""
        overrides.setdefault("id2label", segmentation_id2label(CAM_CLASSES))
        return self.get_config(**overrides)

    def prepare_pixel_values(self, batch_size=2, height=None, width=None, seed=0):
        generator = torch.Generator().manual_seed(seed)
        height = height or self.image_size
        width = width or self.image_size
        return torch.randn(batch_size, 3, height, width, generator=generator)

    def prepare_cam_labels(self, batch_size=2, num_labels=NUM_CAM_LABELS, seed=0):
        """Multi-hot labels with at least one present and one absent class per image."""
        generator = torch.Generator().manual_seed(seed)
        labels = (torch.rand(batch_size, num_labels, generator=generator) > 0.5).float()
        labels[:, 0] = 1.0
        labels[:, -1] = 0.0
        return labels

    def prepare_segmentation_labels(self, batch_size=2, height=None, width=None, num_labels=NUM_CAM_LABELS + 1,
                                    seed=0, ignore_fraction=0.1):  # fmt: skip
        """Int64 class-id maps with a fraction of pixels set to the ignore index 255."""
        generator = torch.Generator().manual_seed(seed)
        height = height or self.image_size
        width = width or self.image_size
        labels = torch.randint(0, num_labels, (batch_size, height, width), generator=generator)
        ignored = torch.rand(batch_size, height, width, generator=generator) < ignore_fraction
        return labels.masked_fill(ignored, 255)


@pytest.fixture
def tester():
    return WeakTrModelTester()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so weights built inside tests are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def single_thread():
    """Run on one intra-op thread: tiny tensors gain nothing from more, and on a busy machine threads that wait for
    each other at every op make a tiny model's training loop many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def authors_rope_table(grid_side, head_dim=64, reference_grid=16):
    """The authors' EVA-02 rotary table (their rope.VisionRotaryEmbeddingFast with pt_seq_len = `reference_grid`,
    ft_seq_len = `grid_side`), written out from their OnlineRetraining/segm/model/rope.py: `(cos, sin)`, each
    `(grid_side ** 2, head_dim)`. Square grids only, as theirs."""
    half = head_dim // 2
    theta = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    positions = torch.arange(grid_side) / grid_side * reference_grid
    freqs = torch.einsum("i,f->if", positions, theta).repeat_interleave(2, dim=-1)  # (n, half)
    table = torch.cat([freqs[:, None].expand(-1, grid_side, -1), freqs[None].expand(grid_side, -1, -1)], dim=-1)
    return table.cos().reshape(-1, head_dim), table.sin().reshape(-1, head_dim)


# Markers that transformers' common test files (run by test_*_common.py) put on their tests.
TRANSFORMERS_SUITE_MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                              "torch_compile_test", "slow")  # fmt: skip


def pytest_configure(config):
    for marker in TRANSFORMERS_SUITE_MARKERS:
        config.addinivalue_line("markers", f"{marker}: used by transformers' common test suite")


def pytest_terminal_summary(terminalreporter):
    """Say why transformers' common tests did not run: a module-level skip is only a count in `pytest -q`."""
    reasons = sorted({
        report.longrepr[2].removeprefix("Skipped: ")
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and "transformers' common" in report.longrepr[2]
    })  # fmt: skip
    if reasons:
        terminalreporter.section("transformers' common test suite: SKIPPED")
        for reason in reasons:
            terminalreporter.write_line(reason)
