"""Safe, atomic safetensors reading and writing shared by every BoLID file type.

Writes go to a temporary file in the target folder and are renamed into place, so a crash never leaves a
half-written file. Reading the header first lets loaders check the config before touching tensors.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BoLIDError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_LISTED_KEYS = 5


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Save tensors with string metadata to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + rename): readers see the old file or
    the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_safetensors_metadata(path: str | os.PathLike, error_cls: type[BoLIDError] = BoLIDError) -> dict[str, str]:
    """Read only the JSON header of a safetensors file; a truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"file not found: {path} (folder {path.parent})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise error_cls(f"{path}: not a safetensors file (only {size} bytes); re-download or re-export it")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise error_cls(f"{path}: not a safetensors file, or truncated (header length {header_len}, size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise error_cls(f"{path}: corrupt safetensors header ({exc})") from exc
    offsets = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if offsets and 8 + header_len + max(offsets) > size:
        raise error_cls(
            f"{path}: truncated: the header promises {8 + header_len + max(offsets)} bytes, the file has {size}; "
            "re-download or re-export it"
        )
    return dict(header.get("__metadata__") or {})


def load_safetensors(path: str | os.PathLike, error_cls: type[BoLIDError] = BoLIDError,
                     device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata, after validating the header."""
    metadata = read_safetensors_metadata(path, error_cls)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise error_cls(f"{path}: cannot read tensors ({exc})") from exc
    return tensors, metadata


def check_state_dict(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str,
                     error_cls: type[BoLIDError], declared: str = "its declared config") -> None:
    """Refuse missing/extra keys, wrong shapes and non-finite values, naming the file and the first offenders."""
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:MAX_LISTED_KEYS])})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {', '.join(extra[:MAX_LISTED_KEYS])})")
        raise error_cls(f"{source}: does not match {declared}: {'; '.join(parts)}")
    for key, ref in reference.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise error_cls(f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, {declared} requires "
                            f"{tuple(ref.shape)}")
        if not torch.isfinite(tensors[key]).all():
            raise error_cls(f"{source}: tensor {key} contains NaN or Inf values; the file is damaged")
