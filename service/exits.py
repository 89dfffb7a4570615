"""The exit codes of `anytime-serve` and its child processes, in one place."""

from __future__ import annotations

import sys

OK = 0  # served and drained
FAILED = 1  # the HTTP server did not start (e.g. the port is taken), or the supervisor died
CANNOT_SERVE = 2  # invalid settings, or the models cannot be served (the supervisor does not restart this)


def cannot_serve(reason: str) -> int:
    """Say why on stderr; the exit code to return."""
    sys.stderr.write(f"anytime-serve: {reason}\n")
    return CANNOT_SERVE
