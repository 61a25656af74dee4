"""The one compute config: how a model runs over samples (`EngineConfig`).

Kept apart from `engine.py` (which imports torch) so what only describes or validates a run --
the `majortom` argument parser, the Dagster resources and settings -- loads without torch;
`engine` re-exports every name here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from majortom_assets.standard import CORE_IMAGE_SIZE

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Above this a batch of 224 px 13-band fragments alone needs > 10 GB; OOM halving starts from
# the configured size, so a larger value only wastes the first attempts (or the host's memory).
MAX_BATCH_SIZE = 4096


class EngineConfig(BaseModel):
    """How to run a model over samples; validated so a bad value fails before any work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="auto | cpu | cuda | cuda:<index> (auto: CUDA when present)")
    precision: Precision = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE,
                            description="fragments per model call (cells are mixed freely)")
    decode_workers: int = Field(2, ge=1, description="threads reading and decoding samples")
    decode_processes: int = Field(
        0, ge=0, le=256,
        description="worker processes that read, decode and fragment samples into shared memory "
                    "(0 = threads only); they scale past the GIL, which caps threads at ~2 cores",
    )
    prefetch_samples: int = Field(4, ge=1, description="samples decoded ahead of the model")
    channels_last: bool = Field(True, description="channels-last memory format for CNNs")
    image_size: int = Field(CORE_IMAGE_SIZE, ge=1, description="10 m side the samples are decoded to")

    @classmethod
    def from_values(cls, values: Mapping[str, Any], label: Callable[[str], str] = str) -> EngineConfig:
        """The config of `values`, or a ValueError of one line naming each bad value by
        `label(field)` (a CLI flag, an environment variable, a resource field), so every front end
        reports a bad device, precision or batch size the same way and says what to change."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = label(str(err["loc"][0])) if err["loc"] else "engine config"
                given = err.get("input")
                message = err["msg"].removeprefix("Value error, ")
                if isinstance(given, (str, int, float, bool)) and repr(given) not in message:
                    message += f" (got {given!r})"
                problems.append(f"{name}: {message}")
            raise ValueError("; ".join(problems)) from None

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {value!r}")
        return value

    def resolve_device(self) -> torch.device:
        import torch  # here, so the config (CLI flags, Dagster resources) loads without torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available; use --device cpu")
            index = device.index or 0
            if index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {self.device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
                )
        return device

    def resolve_precision(self, device: torch.device) -> str:
        """'auto' means bf16 autocast on CUDA and plain fp32 on CPU; fp16 needs CUDA."""
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return self.precision
