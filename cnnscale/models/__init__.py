"""The model zoo: CIFAR (32x32x3) variants of classic CNNs, created by name.

Importing this package imports every family module, so the registry is full: ``list_models()`` names them all
and ``create_model(name)`` builds one. ``cnnscale models`` prints them with params, MACs and FLOPs.
"""

from cnnscale.models import alexnet, lenet, mobilenet, resnet, vgg  # noqa: F401  (registers the builders)
from cnnscale.models._registry import create_model, get_model_builder, list_models, model_family, register_model

__all__ = [
    "create_model", "get_model_builder", "list_models", "model_family", "register_model", "SEED_MODELS",
]

# The five models of the seed's study. ``vgg16`` is the CIFAR VGG-16 without BatchNorm (torchvision naming; the
# vgg module's docstring explains the choice).
SEED_MODELS: tuple[str, ...] = ("lenet5", "alexnet", "vgg16", "resnet18", "mobilenet_v2")
