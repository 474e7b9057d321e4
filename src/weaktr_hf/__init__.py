"""weaktr-hf: WeakTr weakly-supervised semantic segmentation with plain Vision Transformers, for Hugging Face.

Importing the package registers the `weaktr` model type with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_weaktr import WeakTrConfig
from .image_processing_weaktr import WeakTrImageProcessor, cams_to_label_map, normalize_cams
from .modeling_weaktr import (
    WeakTrCAMOutput,
    WeakTrForCAM,
    WeakTrForSemanticSegmentation,
    WeakTrModel,
    WeakTrModelOutput,
    WeakTrPreTrainedModel,
    WeakTrSemanticSegmenterOutput,
    clip_pixel_losses,
    semantic_segmentation_loss,
    upsample_logits,
)
from .timm_backbone import BackboneLoadingReport, load_timm_backbone, prepare_timm_backbone

__version__ = "0.1.0"

AutoConfig.register("weaktr", WeakTrConfig, exist_ok=True)
AutoModel.register(WeakTrConfig, WeakTrModel, exist_ok=True)
AutoModelForImageClassification.register(WeakTrConfig, WeakTrForCAM, exist_ok=True)
AutoModelForSemanticSegmentation.register(WeakTrConfig, WeakTrForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(WeakTrConfig, image_processor_classes={"torchvision": WeakTrImageProcessor}, exist_ok=True)

# Saved folders carry their code and an `auto_map`, so they also load with `trust_remote_code=True` where this
# package is not installed (the image processor adds itself to the model's `auto_map` when saved after the model:
# `WeakTrImageProcessor.save_pretrained`). Importing modeling_weaktr lists the segmenter in the pipeline's table.
WeakTrConfig.register_for_auto_class()
WeakTrModel.register_for_auto_class("AutoModel")
WeakTrForCAM.register_for_auto_class("AutoModelForImageClassification")
WeakTrForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "BackboneLoadingReport",
    "WeakTrCAMOutput",
    "WeakTrConfig",
    "WeakTrForCAM",
    "WeakTrForSemanticSegmentation",
    "WeakTrImageProcessor",
    "WeakTrModel",
    "WeakTrModelOutput",
    "WeakTrPreTrainedModel",
    "WeakTrSemanticSegmenterOutput",
    "cams_to_label_map",
    "clip_pixel_losses",
    "load_timm_backbone",
    "prepare_timm_backbone",
    "normalize_cams",
    "semantic_segmentation_loss",
    "upsample_logits",
]
