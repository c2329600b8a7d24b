"""Model registry: builders register under a name, the CLI and configs create models by that name.

``@register_model`` records the builder and its family (the defining module's name, e.g. ``"vgg"``, unless given).
A name can be registered once; registering it again is a bug and raises ``ValueError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from cnnscale.errors import UserError, choices_error

__all__ = ["register_model", "create_model", "list_models", "model_family", "get_model_builder"]

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, str] = {}


def register_model(
    name: str | BuilderT | None = None, *, family: str | None = None
) -> BuilderT | Callable[[BuilderT], BuilderT]:
    """Register a model builder. Use bare (``@register_model``) or called (``@register_model("name", family="x")``).

    The name defaults to the builder's ``__name__``; the family to the last component of its module's name.
    """
    if callable(name):  # bare decorator
        return register_model()(name)

    def decorator(fn: BuilderT) -> BuilderT:
        key = name or fn.__name__
        if key in _BUILDERS:
            raise ValueError(f"model {key!r} is already registered (by {_BUILDERS[key].__module__})")
        _BUILDERS[key] = fn
        _FAMILIES[key] = family or fn.__module__.rsplit(".", 1)[-1]
        return fn

    return decorator


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``family`` when given."""
    return sorted(n for n in _BUILDERS if family is None or _FAMILIES[n] == family)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; :class:`UserError` listing the valid names when there is none."""
    if name not in _BUILDERS:
        raise choices_error("model", name, list_models())
    return _BUILDERS[name]


def model_family(name: str) -> str:
    """The family (``"vgg"``, ``"resnet"``, ...) of a registered model."""
    get_model_builder(name)
    return _FAMILIES[name]


def create_model(name: str, num_classes: int | None = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model. Keyword arguments whose value is ``None`` are dropped, so the model's defaults
    apply (a config's ``width_mult: null`` reaches every model; ``num_classes`` None is 10, CIFAR-10's). An
    argument the builder does not take is a :class:`UserError` naming the ones it does."""
    builder = get_model_builder(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(["num_classes", *accepted])
        raise UserError(f"model {name!r} does not take {', '.join(unknown)} (it takes: {takes})")
    return builder(num_classes=10 if num_classes is None else num_classes, **kwargs)
