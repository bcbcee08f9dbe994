"""Body-ID encoder files: the file kind and format version, the content hash, saving and loading.

An encoder file is a safetensors file: the VAE's weights (float32), optionally the stored distribution of the
training identities (``body_prior.*``), and metadata holding the kind, format version, config (JSON), the content
hash that identities record, and the side of the views it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .body_encoder import FORMAT_VERSION, BodyEncoder, BodyEncoderConfig
from .errors import BoLIDError, reading
from .file_kinds import BODY_ENCODER, FileInfo, check_file_kind, read_file_kind
from .safetensors_io import atomic_save_safetensors, check_state_dict, load_safetensors, update_hash_with_weights

READABLE_FORMAT_VERSIONS = (1, 2)
BODY_PRIOR_KEYS = ("body_prior.mean", "body_prior.scale_tril")


class BodyEncoderFileError(BoLIDError):
    """A Body-ID encoder file cannot be read or does not hold a valid encoder."""


def config_metadata(config: BodyEncoderConfig) -> dict[str, str]:
    """The metadata that declares an encoder file's kind, version and config."""
    return {"bolid_kind": BODY_ENCODER, "bolid_format_version": str(config.format_version),
            "bolid_config": json.dumps(asdict(config), sort_keys=True)}


def config_from_metadata(metadata: dict[str, str], source: str) -> BodyEncoderConfig:
    """The config an encoder file declares, after its kind and version are checked (format 1 is migrated)."""
    version = check_file_kind(metadata, source, BODY_ENCODER, READABLE_FORMAT_VERSIONS, BodyEncoderFileError)
    try:
        raw = json.loads(metadata["bolid_config"])
        if version == 1:  # before the appearance head and standardised targets
            raw = {**raw, "appearance_dim": 0, "format_version": FORMAT_VERSION}
        return BodyEncoderConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise BodyEncoderFileError(f"{source}: invalid bolid_config metadata ({exc})") from exc


def encoder_hash(model: BodyEncoder) -> str:
    """A short content hash of the architecture and weights: identities remember which encoder made them."""
    h = hashlib.sha256(json.dumps(model.config.architecture(), sort_keys=True).encode())
    update_hash_with_weights(h, model)
    return h.hexdigest()[:16]


def save_body_encoder(model: BodyEncoder, path: str | os.PathLike,
                      extra_metadata: dict[str, str] | None = None) -> str:
    """Write the VAE (fp32) with its config and hash in the metadata, atomically; returns the hash."""
    model_hash = encoder_hash(model)
    metadata = {**config_metadata(model.config), "bolid_encoder_hash": model_hash,
                "bolid_view_size": str(int(model.view_size)), **(extra_metadata or {})}
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if model.body_prior is not None:
        state.update({k: v.detach().to("cpu", torch.float32).contiguous()
                      for k, v in zip(BODY_PRIOR_KEYS, model.body_prior, strict=True)})
    atomic_save_safetensors(state, path, metadata)
    return model_hash


def read_body_encoder_config(path: str | os.PathLike) -> BodyEncoderConfig:
    """The config of an encoder file, checked without reading any tensor."""
    metadata, _ = read_file_kind(path, BODY_ENCODER, READABLE_FORMAT_VERSIONS, BodyEncoderFileError)
    with reading(path, BodyEncoderFileError, "Body-ID encoder"):
        return config_from_metadata(metadata, str(path))


def load_body_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[BodyEncoder, FileInfo]:
    """Load and validate an encoder file: kind, version, config, key set, shapes, finiteness and hash.

    Returns the encoder (frozen, in eval mode) and the file's info, whose ``content_hash`` is
    :func:`encoder_hash` of the loaded weights, computed once here (identities record it).
    """
    path = Path(path)
    config = read_body_encoder_config(path)
    tensors, metadata = load_safetensors(path, BodyEncoderFileError)
    with reading(path, BodyEncoderFileError, "Body-ID encoder"):
        prior = [tensors.pop(k, None) for k in BODY_PRIOR_KEYS]
        if all(t is not None for t in prior):
            d = config.latent_dim
            if tuple(prior[0].shape) != (d,) or tuple(prior[1].shape) != (d, d) or not all(
                    bool(torch.isfinite(t).all()) for t in prior):
                raise BodyEncoderFileError(f"{path}: the stored body distribution (body_prior.*) does not match "
                                           f"the latent size {d} or is not finite; re-export the encoder")
        elif any(t is not None for t in prior):
            raise BodyEncoderFileError(f"{path}: only one of {BODY_PRIOR_KEYS} is present; re-export the encoder")
        with torch.device("meta"):  # the declared layout, checked before any real allocation
            reference = BodyEncoder(config).state_dict()
        check_state_dict(tensors, reference, str(path), BodyEncoderFileError, "its declared encoder config")
        model = BodyEncoder(config)
        model.load_state_dict(tensors, strict=True)
        if prior[0] is not None:
            model.body_prior = (prior[0].float(), prior[1].float())
        digest = encoder_hash(model)
    stored = metadata.get("bolid_encoder_hash")
    if stored and stored != digest:
        raise BodyEncoderFileError(f"{path}: the weights do not match the hash stored in the file ({stored}); "
                                   "the file was modified or damaged, re-export it")
    model.view_size = _stored_view_size(metadata, config)
    model.requires_grad_(False).eval()
    info = FileInfo(path, BODY_ENCODER, int(metadata["bolid_format_version"]), metadata, digest)
    return model.to(device), info


def _stored_view_size(metadata: dict[str, str], config: BodyEncoderConfig) -> int:
    """The training views' side: recorded by save_body_encoder; older stage-1 exports name it in their training
    record (the dataset's crop_size); else the encoder's own input size."""
    try:
        if "bolid_view_size" in metadata:
            return int(metadata["bolid_view_size"])
        return int(json.loads(metadata["bolid_training"])["dataset"]["crop_size"])
    except (KeyError, TypeError, ValueError):
        return config.crop_size

