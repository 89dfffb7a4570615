"""Multi-exit networks for self-distillation and anytime inference, and their artifact format.

Importing the package imports every model family, and each family registers its builders;
the registry itself imports no family (no import cycle).
"""

from models import pyramidnet, resnet, resnext, testing, vgg, wide_resnet  # noqa: F401 - registers the families
from models.multi_exit import MultiExitNet, MultiExitOutput
from models.registry import build_model, list_models, register_model

__all__ = ["MultiExitNet", "MultiExitOutput", "build_model", "list_models", "register_model"]
