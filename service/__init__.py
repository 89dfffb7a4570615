"""The anytime inference server: protocols over one data plane, the stage-level engine, metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anytime-serve")  # the one version string: pyproject.toml's
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
