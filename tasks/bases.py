"""Registry of frozen pretrained bases (keras.applications). TensorFlow is imported lazily."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseSpec:
    """What the pipeline needs to know about one keras.applications architecture."""

    constructor: str  # attribute of keras.applications, resolved through an explicit table in the loader
    preprocess_module: str
    default_size: tuple[int, int]
    feature_dim: int
    blocks: tuple[str, ...]  # layer-name prefixes of the named blocks, first to last


BASE_MODELS: dict[str, BaseSpec] = {
    "mobilenet_v2": BaseSpec("MobileNetV2", "mobilenet_v2", (224, 224), 1280, ()),
    "mobilenet": BaseSpec("MobileNet", "mobilenet", (224, 224), 1024, ()),
    "efficientnet_b0": BaseSpec("EfficientNetB0", "efficientnet", (224, 224), 1280, ()),
    "resnet50": BaseSpec("ResNet50", "resnet50", (224, 224), 2048, ()),
    "vgg16": BaseSpec("VGG16", "vgg16", (224, 224), 512, ()),
}
