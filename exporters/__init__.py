"""Exporters: ONNX export with parity checks, ORT graph optimisation, the ORT mobile format.
`from compress.exporters import ExportOnnx, OptimizeOrt, ExportOrt` (loaded lazily)."""
from __future__ import annotations

import importlib

_CONFIGS = {
    "ExportOnnx": "compress.exporters.onnx_export",
    "OptimizeOrt": "compress.exporters.ort_optimize",
    "ExportOrt": "compress.exporters.ort_mobile",
}


def __getattr__(name: str):
    if name in _CONFIGS:
        return getattr(importlib.import_module(_CONFIGS[name]), name)
    raise AttributeError(f"module 'compress.exporters' has no attribute '{name}'")


__all__ = sorted(_CONFIGS)
