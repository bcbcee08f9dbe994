"""Safe, atomic safetensors reading and writing shared by every BoLID file type.

Writes go to a temporary file in the target folder and are renamed into place, so a crash never leaves a
half-written file. Reading the header first lets loaders check the config before touching tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BoLIDError, reading

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_LISTED_KEYS = 5


def update_hash_with_weights(h: Any, module: torch.nn.Module) -> None:
    """Feed a module's parameters and buffers (name, shape, fp32 values, in name order) to a hash: the one rule for
    "these are the same weights", used for stored-encoder hashes and cache fingerprints."""
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file the mode a plain ``open()`` would (mkstemp makes it 0600, which a ComfyUI running as
    another user could not read), then rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Save tensors with string metadata to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        _publish(tmp, path)
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
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# bytes per element of every dtype the safetensors format defines (others are refused before any read)
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(path: Path, header: object, data_size: int, error_cls: type[BoLIDError]) -> dict[str, str]:
    """Validate the parsed JSON header against the safetensors format; returns the metadata."""
    if not isinstance(header, dict):
        raise error_cls(f"{path}: not a safetensors file: the header is a JSON {type(header).__name__}, not an "
                        "object; re-download or re-export it")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise error_cls(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise error_cls(f"{path}: corrupt safetensors header: entry {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise error_cls(f"{path}: tensor {key!r} has dtype {dtype!r}; safetensors dtypes are "
                            f"{', '.join(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise error_cls(f"{path}: tensor {key!r} has shape {shape!r}; a shape is a list of sizes >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise error_cls(f"{path}: tensor {key!r} has data_offsets {offsets!r}; expected [begin, end] with "
                            "0 <= begin <= end")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise error_cls(f"{path}: tensor {key!r} ({dtype} {shape}) needs {nbytes} bytes, its data_offsets span "
                            f"{offsets[1] - offsets[0]}; the file is damaged")
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise error_cls(f"{path}: tensor {key!r} starts at byte {begin} of the data, expected {position} "
                            "(overlapping or gapped tensors); the file is damaged")
        position = end
    if position > data_size:
        raise error_cls(f"{path}: truncated: the header promises {position} bytes of tensor data, the file has "
                        f"{data_size}; re-download or re-export it")
    if position < data_size:
        raise error_cls(f"{path}: {data_size - position} unexpected bytes after the tensor data; the file is damaged")
    return dict(metadata)


def read_safetensors_metadata(path: str | os.PathLike, error_cls: type[BoLIDError] = BoLIDError) -> dict[str, str]:
    """Read and validate only the JSON header of a safetensors file; any malformed header is ``error_cls``.

    Checks everything the format defines (an object of string metadata and tensor entries with a known dtype, a
    shape, and in-range, non-overlapping offsets covering the data exactly), so loaders can trust the layout.
    """
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"file not found: {path} (folder {path.parent})")
    with reading(path, error_cls, "safetensors file"):
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise error_cls(f"{path}: not a safetensors file (only {size} bytes); re-download or re-export it")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len < 2 or header_len > min(MAX_HEADER_BYTES, size - 8):
                raise error_cls(f"{path}: not a safetensors file, or truncated (header length {header_len}, "
                                f"size {size})")
            try:
                header = json.loads(f.read(header_len))
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise error_cls(f"{path}: corrupt safetensors header ({type(exc).__name__}: {exc})") from exc
        return _check_header(path, header, size - 8 - header_len, error_cls)


def load_safetensors(path: str | os.PathLike, error_cls: type[BoLIDError] = BoLIDError,
                     device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata, after validating the header."""
    metadata = read_safetensors_metadata(path, error_cls)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors and torch raise their own error types
        raise error_cls(f"{path}: cannot read tensors ({type(exc).__name__}: {exc}); re-download or re-export "
                        "it") from exc
    return tensors, metadata


def check_state_dict(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str,
                     error_cls: type[BoLIDError], declared: str = "its declared config") -> None:
    """Refuse missing/extra keys, wrong shapes, non-float dtypes and non-finite values, naming the file and the
    first offenders."""
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
        if not tensors[key].is_floating_point():
            raise error_cls(f"{source}: tensor {key} has dtype {tensors[key].dtype}; BoLID weights are floating "
                            "point: the file is damaged or not a BoLID file")
        if not torch.isfinite(tensors[key]).all():
            raise error_cls(f"{source}: tensor {key} contains NaN or Inf values; the file is damaged")
