"""Exporters: ONNX export with parity checks, ORT graph optimisation, the ORT mobile format.
`from compress.exporters import ExportOnnx, OptimizeOrt, ExportOrt` (loaded lazily)."""
from __future__ import annotations


def __getattr__(name: str):
    from compress.registry import config_class

    # Config classes are CamelCase; anything else (a submodule being imported) is not looked up here.
    config = config_class(name, __name__) if name[:1].isupper() else None
    if config is None:
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    return config
