"""dlkeeper's supervisor process: config, boot order, actor kit, messages and the CLIs."""

# The one place the version is written; pyproject.toml reads it from here. (Asking
# importlib.metadata at import cost 25 ms in each of the daemon's two processes.)
__version__ = "0.1.0"
