"""compress: a pass pipeline that makes trained models small and fast for edge runtimes."""
from compress.errors import ConfigError, UserError
from compress.pipeline import Pipeline, Result

__all__ = ["Pipeline", "Result", "ConfigError", "UserError"]
__version__ = "0.1.0"
