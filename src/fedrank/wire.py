"""The dtype of the tensors that cross the wire (``comm.dtype``).

The server casts each payload to the wire dtype before sending it; a client casts what it received back to
fp32, trains, and answers in the dtype it was sent; the server casts the replies back to fp32 before checking
and aggregating them.  Only floating tensors are cast (integer tensors such as module indices travel as they
are), so the byte counters see exactly what is sent.
"""

from __future__ import annotations

import torch
from torch import Tensor

Tensors = dict[str, Tensor]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in DTYPES.items()}
BF16_BITS = "@bf16-bits"  # key suffix of a bf16 tensor carried as its int16 bit pattern (see `as_numpy_safe`)


def encode(tensors: Tensors, dtype: str) -> Tensors:
    """The tensors with every floating one cast to ``dtype`` (fp32 | bf16 | fp16)."""
    target = DTYPES[dtype]
    return {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}


def decode(tensors: Tensors) -> Tensors:
    """The tensors with every floating one back in fp32."""
    return {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}


def dtype_of(tensors: Tensors) -> str:
    """The wire dtype of a message: that of its floating tensors (fp32 when it has none)."""
    return next((_NAMES[t.dtype] for t in tensors.values() if t.is_floating_point()), "fp32")


def as_numpy_safe(tensors: Tensors) -> Tensors:
    """bf16 tensors as their int16 bit patterns under a marked key, for codecs that go through NumPy (which has
    no bfloat16); ``from_numpy_safe`` undoes it exactly."""
    out: Tensors = {}
    for k, t in tensors.items():
        if t.dtype == torch.bfloat16:
            k, t = k + BF16_BITS, t.view(torch.int16)
        out[k] = t
    return out


def from_numpy_safe(tensors: Tensors) -> Tensors:
    return {k.removesuffix(BF16_BITS): t.view(torch.bfloat16) if k.endswith(BF16_BITS) else t
            for k, t in tensors.items()}
