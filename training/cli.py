"""`anytime-train`: train a self-distilled multi-exit network (`torchrun` for DDP)."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from training.config import config_from_args, settings_error
from training.data import DataError
from training.evaluate import format_accuracy_table


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config_from_args(argv)
        from training.trainer import Trainer, leave_distributed  # heavy imports after the flags are known good

        try:
            rows = Trainer(cfg).fit()
        finally:
            leave_distributed()
    except ValidationError as exc:
        sys.stderr.write(f"anytime-train: error: {settings_error(exc)}\n")
        return 2
    except (DataError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"anytime-train: error: {exc}\n")
        return 2
    if rows:
        sys.stdout.write(format_accuracy_table(rows) + "\n")
        sys.stdout.write(f"run written to {cfg.out_dir}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
