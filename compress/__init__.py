"""compress: a pass pipeline that makes trained models small and fast for edge runtimes."""
from compress.errors import ConfigError, UserError

__all__ = ["Pipeline", "Result", "ConfigError", "UserError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Pipeline and Result are imported on first use, so the `compress` command starts (and answers
    Ctrl-C with "interrupted") before the pipeline's many imports."""
    if name in ("Pipeline", "Result"):
        from compress import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
