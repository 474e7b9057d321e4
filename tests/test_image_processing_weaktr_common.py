"""transformers' common image-processor tests (`ImageProcessingTestMixin` and its semantic-segmentation
post-processing mixin, from the sdist of the installed transformers) on WeakTrImageProcessor.

The suite comes from `transformers_test_suite` (downloaded once, cached outside the repository); when it cannot be
had, this module is skipped and the reason is printed in pytest's summary.
"""

import unittest

import pytest
from transformers_test_suite import SuiteUnavailable, load

from weaktr_hf import WeakTrImageProcessor

try:
    common = load("test_image_processing_common")
except SuiteUnavailable as error:
    pytest.skip(f"transformers' common image-processor tests not run: {error}", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread")


class WeakTrImageProcessingTester(common.ImageProcessingTester):
    """Processor arguments as SegFormer's tester sets them (a small fixed size), with the patch size of the tiny
    models; the suite finds processor classes from the test file's folder name, so ours is named here."""

    num_labels = 4

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 32, "width": 32})
        kwargs.setdefault("size_divisor", 8)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        return {"torchvision": WeakTrImageProcessor}

    def prepare_post_process_semantic_segmentation_inputs(self):
        """Logits at the model's output resolution: one cell per `size_divisor` (patch) pixels of the processed size,
        where the suite's default assumes logits at the processed size itself (SegFormer's are)."""
        inputs, expected = super().prepare_post_process_semantic_segmentation_inputs()
        rows, cols = self.size["height"] // self.size_divisor, self.size["width"] // self.size_divisor
        inputs["outputs"].logits = inputs["outputs"].logits[..., :rows, :cols].contiguous()
        return inputs, {**expected, "height": rows, "width": cols}


class WeakTrImageProcessingTest(
    common.ImageProcessingTestMixin, common.PostProcessSemanticSegmentationTestMixin, unittest.TestCase
):
    image_processor_tester_class = WeakTrImageProcessingTester
