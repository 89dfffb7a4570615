"""Model registry: builders registered by name, looked up by `build_model`.

The registry imports no model family: each family module registers its builders when it is
imported, and `models/__init__.py` imports every family (timm's layout). So there is no import
cycle, and the registry is complete as soon as `models` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from models.multi_exit import MultiExitNet

Builder = Callable[..., "MultiExitNet"]
_REGISTRY: dict[str, Builder] = {}
Stem = Literal["cifar", "imagenet"]
STEMS: tuple[str, ...] = get_args(Stem)


def register_model(fn: Builder | None = None, *, name: str | None = None) -> Any:
    """Register a builder under its function name, or under `name` (`@register_model(name="wrn_16_4")`)."""

    def add(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"Model {key!r} is already registered")
        _REGISTRY[key] = builder
        return builder

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    **kwargs: Any,
) -> MultiExitNet:
    """Build a registered multi-exit network by name."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"Unknown model {name!r}; known: {known}")
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}; use 'cifar' or 'imagenet'")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, stem=stem, **kwargs)
