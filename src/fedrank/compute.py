"""Where and in what precision a model computes: the ``device`` and ``precision`` options.

Only the model, its batches and its arithmetic live on the device.  Everything that leaves a
client or the server (payloads, uploads, checkpoints, the exported adapter) is CPU fp32 whatever
the device; ``precision`` is autocast around forward passes, so LoRA factors, the head, the
optimizer state and aggregation stay fp32.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrank.config import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def has_bf16_units(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support (Ampere or later), or a CPU with
    AVX-512 bf16 or AMX instructions.  Elsewhere bf16 is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where the device has bf16 units (``has_bf16_units``), else ``fp32``; others as given."""
    if name != "auto":
        return name
    return "bf16" if has_bf16_units(device) else "fp32"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if present, else CPU; an explicit device must exist on this machine (else ConfigError)."""
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"`device` must be {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name} but torch {torch.__version__} sees no CUDA device on this machine: "
                              "use device=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name} but this machine has {count} CUDA device(s): "
                              f"use cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} but MPS is not available on this machine: use device=cpu (or auto)")
    return device


@dataclass(frozen=True)
class Compute:
    """A device and an autocast precision, with the few operations the training and evaluation loops need."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    @classmethod
    def of(cls, device: str, precision: str) -> Compute:
        """The config's device and precision (``auto`` resolved for that device); on CUDA, deterministic kernels
        are requested so that the same seed gives the same run (cuBLAS needs its workspace setting before its first
        use; ops without a deterministic kernel warn)."""
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        return cls(resolved, resolve_precision(precision, resolved))

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None for fp32)."""
        return PRECISIONS[self.precision]

    def autocast(self) -> AbstractContextManager:
        """Autocast to ``precision`` on the device (a no-op for fp32); parameters stay fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for fp16 (fp16 gradients underflow without one); disabled, so a pass-through, otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's tensors on the device."""
        return {k: v.to(self.device) for k, v in batch.items()}
