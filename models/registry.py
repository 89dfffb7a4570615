"""Model registry: builders registered by name, looked up by `build_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.multi_exit import MultiExitNet

Builder = Callable[..., "MultiExitNet"]
_REGISTRY: dict[str, Builder] = {}


def register_model(fn: Builder) -> Builder:
    """Register a model builder under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"Model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _import_families()
    return sorted(_REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    **kwargs: Any,
) -> MultiExitNet:
    """Build a registered multi-exit network by name."""
    _import_families()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"Unknown model {name!r}; known: {known}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"Unknown stem {stem!r}; use 'cifar' or 'imagenet'")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, stem=stem, **kwargs)


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    from models import pyramidnet, resnet, resnext, testing, vgg, wide_resnet  # noqa: F401


def build_model_from_spec(spec: dict[str, Any]) -> MultiExitNet:
    """Rebuild a network from the architecture spec that checkpoints and artifacts carry.

    `spec` is ``{"name", "num_classes", "in_channels", "stem", "kwargs"}``.
    """
    missing = {"name", "num_classes", "in_channels", "stem"} - set(spec)
    if missing:
        raise ValueError(f"Architecture spec lacks {', '.join(sorted(missing))}")
    return build_model(
        spec["name"], int(spec["num_classes"]), int(spec["in_channels"]), spec["stem"], **spec.get("kwargs", {})
    )
