"""Algorithm passes. Configs are importable from here for the Python builder, loaded lazily:
`from compress.passes import QuantInt8`."""
from __future__ import annotations

import importlib

_CONFIGS = {
    "QuantInt8": "compress.passes.quant_int8",
    "QuantInt4": "compress.passes.quant_int4",
    "Profile": "compress.passes.profile",
}


def __getattr__(name: str):
    if name in _CONFIGS:
        return getattr(importlib.import_module(_CONFIGS[name]), name)
    raise AttributeError(f"module 'compress.passes' has no attribute '{name}'")


__all__ = sorted(_CONFIGS)
