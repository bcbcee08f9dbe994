"""Reading and writing BoLID adapter files, and exporting a branch as a stock IP-Adapter file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapter import BRANCHES, BoLIDAdapter, Branch, layer_key
from .config import FORMAT_VERSION, AdapterConfig
from .errors import AdapterFileError, reading
from .file_kinds import ADAPTER, FileInfo, read_file_kind
from .safetensors_io import atomic_save_safetensors, check_state_dict, load_safetensors

# metadata key: hash of the Body-ID encoder whose c_body the adapter was trained on (Apply refuses others)
BODY_ENCODER_HASH_KEY = "bolid_body_encoder_hash"


def save_adapter(adapter: BoLIDAdapter, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the adapter and its config (plus e.g. training metadata) atomically."""
    metadata = {**adapter.config.to_metadata(), **(extra_metadata or {})}
    atomic_save_safetensors(adapter.state_dict(), path, metadata)


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The config of an adapter file, checked without reading any tensor."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[AdapterConfig, dict[str, str]]:
    metadata, _ = read_file_kind(path, ADAPTER, (FORMAT_VERSION,), AdapterFileError)
    with reading(path, AdapterFileError, "BoLID adapter"):
        return AdapterConfig.from_metadata(metadata, str(path)), metadata


def load_adapter(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[BoLIDAdapter, FileInfo]:
    """Load and validate an adapter file: config, key set and every tensor shape.

    Returns the adapter and the file's info; ``info.metadata[BODY_ENCODER_HASH_KEY]`` names the Body-ID encoder
    the adapter was trained with (when recorded)."""
    path = Path(path)
    config, metadata = _read_header(path)
    tensors, _ = load_safetensors(path, AdapterFileError)
    with reading(path, AdapterFileError, "BoLID adapter"):
        with torch.device("meta"):  # the declared layout, checked before any real allocation
            reference = BoLIDAdapter(config).state_dict()
        check_state_dict(tensors, reference, str(path), AdapterFileError, f"its declared config {config.describe()}")
        adapter = BoLIDAdapter(config)
        adapter.load_state_dict(tensors, strict=True)
    adapter.requires_grad_(False).eval()
    info = FileInfo(path, ADAPTER, int(metadata["bolid_format_version"]), metadata)
    return adapter.to(device=device, dtype=dtype), info  # outside the net: out of memory is not a bad file


def ip_adapter_state_dict(adapter: BoLIDAdapter, branch: Branch) -> dict[str, torch.Tensor]:
    """One branch as a FaceID-style IP-Adapter state dict (``image_proj.*`` and ``ip_adapter.{i}.to_k_ip``)."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    out = {f"image_proj.{k}": v for k, v in adapter.projection(branch).state_dict().items()}
    for i in range(adapter.config.num_layers):
        to_k, to_v = adapter.layer(i).projections(branch)
        out[f"ip_adapter.{layer_key(i)}.to_k_ip.weight"] = to_k.weight
        out[f"ip_adapter.{layer_key(i)}.to_v_ip.weight"] = to_v.weight
    return out


def export_ip_adapter(adapter: BoLIDAdapter, branch: Branch, path: str | os.PathLike) -> None:
    """Write one branch as a stock IP-Adapter .safetensors that diffusers' ``load_ip_adapter`` accepts."""
    metadata = {"bolid_exported_branch": branch, "bolid_family": adapter.config.family}
    atomic_save_safetensors(ip_adapter_state_dict(adapter, branch), path, metadata)
