"""Command-line flags for a pydantic-settings class: one flag per setting, over its environment variables."""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def settings_from_args(cls: type[S], argv: list[str] | None, prog: str, description: str) -> S:
    """`cls` built from flags (`--some-setting`, `--flag/--no-flag` for booleans) where given,
    else from its environment variables, else from its defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, type=field.annotation, help=field.description)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return cls(**given)
