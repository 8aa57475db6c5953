"""Pass configs: small frozen pydantic models. Unknown keys are rejected; every field carries a
description (it feeds `compress passes` and the docs) and, where numeric, a range."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

Form = Literal["torch", "onnx", "ort", "pte"]  # pte: an ExecuTorch program (export.executorch)


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError(f"must be a power of two (16, 32, 64, 128, 256), got {v}")
    return v


BlockSize = Annotated[int, AfterValidator(_power_of_two)]  # weights per quantization block / group; bounds via Field


class PassConfig(BaseModel):
    """Base of every pass config. Subclasses set `pass_name`, the dotted registry name."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    pass_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Recipe form: `{"pass": name, **params}` with only JSON/YAML-friendly values."""
        return {"pass": self.pass_name, **self.model_dump(mode="json")}

    def describe(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.model_dump(mode="json").items())
        return f"{self.pass_name}:{params}" if params else self.pass_name
