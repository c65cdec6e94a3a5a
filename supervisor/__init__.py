"""dlkeeper's supervisor process: config, boot order, actor kit, messages and the CLIs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dlkeeper")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
