"""Crash-safe checkpoints: safetensors + JSON, written atomically, verified by checksum on load.

``DIR/checkpoints/round-NNNN.safetensors`` holds every tensor of the server state;
``round-NNNN.json`` is the manifest (round, JSON state, the tensor file's SHA-256) and is
written last, so a manifest only exists for a complete tensor file.  Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

KEEP = 2
_NAME = re.compile(r"round-(\d{4,})\.json$")


@dataclass
class Checkpoint:
    round: int
    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(folder: Path, round: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    blob = folder / f"round-{round:04d}.safetensors"
    tmp = blob.with_name(f".{blob.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, blob)
    manifest = {"round": round, "tensors": blob.name, "sha256": _sha256(blob), "meta": meta}
    atomic_write(folder / f"round-{round:04d}.json", json.dumps(manifest).encode())
    for old in sorted(_rounds(folder))[:-KEEP]:
        for suffix in (".json", ".safetensors"):
            (folder / f"round-{old:04d}{suffix}").unlink(missing_ok=True)


def _rounds(folder: Path) -> list[int]:
    return [int(m.group(1)) for p in folder.glob("round-*.json") if (m := _NAME.search(p.name))]


def latest(folder: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint whose manifest and checksum verify; damaged ones are reported and skipped."""
    if not folder.is_dir():
        return None
    for round in sorted(_rounds(folder), reverse=True):
        manifest_path = folder / f"round-{round:04d}.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            blob = folder / manifest["tensors"]
            if _sha256(blob) != manifest["sha256"]:
                raise ValueError("checksum mismatch")
            return Checkpoint(manifest["round"], load_file(str(blob)), manifest["meta"])
        except (OSError, ValueError, KeyError) as err:
            warn(f"checkpoint of round {round} in {folder} is damaged ({err}); trying the previous one")
    return None
