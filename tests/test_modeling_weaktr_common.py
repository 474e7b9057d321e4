"""transformers' common model tests (`ModelTesterMixin`, from the sdist of the installed transformers) on the three
WeakTr models, each with a tiny config.

The suite comes from `transformers_test_suite` (downloaded once, cached outside the repository). When it cannot be
had, this module is skipped and the reason is printed in pytest's summary. Tests overridden or skipped here are
overridden or skipped the same way by transformers' own vision models; each says which. The suite's own skips match
those of ViT, SegFormer, MobileViT or LeViT; the output-capturing tests skip because the models collect hidden states
and attentions themselves (step 1 needs every layer's attention inside the forward) rather than through
transformers' `capture_outputs` hooks, as MobileViT and LeViT do.
"""

import unittest
from unittest import mock

import pytest
from conftest import CAM_CLASSES, WeakTrModelTester
from torch import nn
from transformers_test_suite import SuiteUnavailable, load

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrModel

try:
    common = load("test_modeling_common")
except SuiteUnavailable as error:
    pytest.skip(f"transformers' common model tests not run: {error}", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread")

ModelTesterMixin = common.ModelTesterMixin
floats_tensor = common.floats_tensor

# The suite picks per-model behaviour (which labels to build, which heads to train...) from the class names in
# transformers' Auto name tables. Our models are registered with the Auto classes (`weaktr_hf/__init__.py`), which
# those tables do not list, so each test case adds its model to the table of the Auto class it is registered with.
AUTO_NAME_TABLES = {
    WeakTrModel: common.MODEL_MAPPING_NAMES,
    WeakTrForCAM: common.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    WeakTrForSemanticSegmentation: common.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
}


class WeakTrCommonModelTester(WeakTrModelTester):
    """The tiny tester of `conftest.py`, with what `ModelTesterMixin` reads: a parent test case, batch size, sequence
    length (prefix tokens + patches) and `prepare_config_and_inputs_for_common`."""

    batch_size = 3
    is_training = True

    def __init__(self, parent, model_class):
        self.parent = parent
        self.model_class = model_class
        self.num_prefix_tokens = len(CAM_CLASSES) if model_class is WeakTrForCAM else 1
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.seq_length = self.num_prefix_tokens + self.num_patches

    def get_model_config(self):
        """Step-1 config for the CAM model, step-2 config (background + classes) for the others."""
        return self.get_config() if self.model_class is WeakTrForCAM else self.get_segmentation_config()

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return self.get_model_config(), {"pixel_values": pixel_values}


class WeakTrModelTestBase(ModelTesterMixin):
    """What the three WeakTr test cases share: a tester for `model_class`, its entry in the Auto name tables, and the
    overrides ViTModelTest makes."""

    model_class = None
    test_resize_embeddings = False  # as ViTModelTest: no token embeddings to resize
    # The suite runs this check only for models whose config file carries a copyright year from 2023 on; ours has no
    # such header, so opt in: every weight must be set by `_init_weights`.
    test_can_init_all_missing_weights_before_2023 = True

    @property
    def all_model_classes(self):
        return (self.model_class,)

    def setUp(self):
        self.model_tester = WeakTrCommonModelTester(self, self.model_class)
        names = mock.patch.dict(AUTO_NAME_TABLES[self.model_class], {"weaktr": self.model_class.__name__})
        names.start()
        self.addCleanup(names.stop)

    @unittest.skip(reason="WeakTr does not use inputs_embeds (ViTModelTest skips it for the same reason)")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        """As ViTModelTest's override: the input embedding is the patch embedding; no output embedding."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            self.assertIs(model.get_input_embeddings(), model.base_model.patch_embed)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))


class WeakTrModelTest(WeakTrModelTestBase, unittest.TestCase):
    model_class = WeakTrModel


class WeakTrForCAMTest(WeakTrModelTestBase, unittest.TestCase):
    model_class = WeakTrForCAM


class WeakTrForSemanticSegmentationTest(WeakTrModelTestBase, unittest.TestCase):
    model_class = WeakTrForSemanticSegmentation
