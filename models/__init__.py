"""Multi-exit networks for self-distillation and anytime inference, and their artifact format."""

from models.multi_exit import MultiExitNet, MultiExitOutput
from models.registry import build_model, list_models, register_model

__all__ = ["MultiExitNet", "MultiExitOutput", "build_model", "list_models", "register_model"]
