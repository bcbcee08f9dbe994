"""Body identity files (text-only mode survives restarts), safe names, prior samples and blends.

A Body ID file is a small safetensors file: tensors ``c_body`` (float32 [d]), optional ``logvar`` and
``view_weights`` (float64, so Python floats round-trip exactly); metadata holds the kind, format version,
encoder hash, views (JSON), extra (JSON) and the dim, so a loader can check it before reading tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Literal

import torch

from .errors import BoLIDError, reading
from .file_kinds import BODY_ID, read_file_kind
from .identity import BodyID
from .safetensors_io import atomic_save_safetensors, load_safetensors

BODY_ID_FORMAT_VERSION = 1
BODY_ID_EXTENSION = ".safetensors"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.\-]{0,127}$")


class BodyIDFileError(BoLIDError):
    """A Body ID file is missing, damaged, of another kind, or a name is unusable."""


class BodyIDMismatchError(BoLIDError):
    """Two body identities cannot be combined (different dims or encoders)."""


def identity_file_path(folder: str | os.PathLike, name: str, what: str = "body ID",
                       error_cls: type[BoLIDError] = BodyIDFileError) -> Path:
    """``folder/name.safetensors`` for a user-supplied name that cannot leave ``folder`` (Body IDs, Face IDs).

    Allowed: letters, digits, space, ``_ . -`` (no separators, no leading dot, no ``..``), at most 128 chars;
    no leading/trailing whitespace or control characters (a pasted trailing newline is refused, not stripped).
    """
    name = str(name)
    if name != name.strip() or any(not c.isprintable() for c in name):
        raise BodyIDFileError(f"body ID name {name!r} starts or ends with whitespace or holds a control character "
                              "(newline, tab, ...): type the name without them")
    if name.lower().endswith(BODY_ID_EXTENSION):
        name = name[: -len(BODY_ID_EXTENSION)]
    if not _SAFE_NAME.fullmatch(name) or ".." in name or name != name.rstrip():
        raise error_cls(f"{what} name {name!r} is not allowed: use letters, digits, spaces, '_', '-', '.' "
                        "(no folders, no '..', not starting with '.'), at most 128 characters")
    root = Path(folder).resolve()
    path = (root / f"{name}{BODY_ID_EXTENSION}").resolve()
    if path.parent != root:
        raise error_cls(f"{what} name {name!r} would leave the folder {root}")
    return path


def refuse_overwrite(path: Path, overwrite: bool, error_cls: type[BoLIDError]) -> None:
    """The saved-identity rule (Body IDs, Face IDs): an existing file is replaced only when the user asks."""
    if path.exists() and not overwrite:
        raise error_cls(f"{path} already exists: choose another name or enable overwrite")


def body_id_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name.safetensors`` for a Body ID name (rules: :func:`identity_file_path`)."""
    return identity_file_path(folder, name, "body ID", BodyIDFileError)


def save_body_id(body_id: BodyID, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``body_id`` atomically; an existing file is an error unless ``overwrite``."""
    path = Path(path)
    refuse_overwrite(path, overwrite, BodyIDFileError)
    tensors = {"c_body": body_id.c_body.to(torch.float32)}
    if body_id.logvar is not None:
        tensors["logvar"] = body_id.logvar.to(torch.float32)
    if body_id.view_weights:
        tensors["view_weights"] = torch.tensor(body_id.view_weights, dtype=torch.float64)
    try:
        extra = json.dumps(body_id.extra, sort_keys=True)
    except TypeError as exc:
        raise BodyIDFileError(f"body ID extra data is not JSON-serialisable ({exc})") from exc
    metadata = {"bolid_kind": BODY_ID, "bolid_format_version": str(BODY_ID_FORMAT_VERSION),
                "bolid_body_dim": str(body_id.dim), "bolid_encoder_hash": body_id.encoder_hash,
                "bolid_views": json.dumps(list(body_id.views)), "bolid_extra": extra}
    atomic_save_safetensors(tensors, path, metadata)
    return path


def load_body_id(path: str | os.PathLike) -> BodyID:
    """Read a Body ID file written by :func:`save_body_id`, checking kind, version and shapes."""
    path = Path(path)
    metadata, _ = read_file_kind(path, BODY_ID, (BODY_ID_FORMAT_VERSION,), BodyIDFileError)
    tensors, _ = load_safetensors(path, BodyIDFileError)
    with reading(path, BodyIDFileError, "BoLID body ID"):
        try:
            views = json.loads(metadata.get("bolid_views", "[]"))
            extra = json.loads(metadata.get("bolid_extra", "{}"))
            dim = int(metadata["bolid_body_dim"])
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise BodyIDFileError(f"{path}: invalid body ID metadata ({exc})") from exc
        if not isinstance(views, list) or not all(isinstance(v, str) for v in views) or not isinstance(extra, dict):
            raise BodyIDFileError(f"{path}: invalid body ID metadata (views must be a list of names, extra an "
                                  "object); the file is damaged")
        c_body = tensors.get("c_body")
        if c_body is None or tuple(c_body.shape) != (dim,) or not c_body.is_floating_point():
            raise BodyIDFileError(f"{path}: c_body missing or not a float vector of {dim} values; the file is damaged")
        logvar = tensors.get("logvar")
        if logvar is not None and (tuple(logvar.shape) != (dim,) or not logvar.is_floating_point()):
            raise BodyIDFileError(f"{path}: logvar is not a float vector of {dim} values; the file is damaged")
        raw_weights = tensors.get("view_weights")
        if raw_weights is not None and (raw_weights.ndim != 1 or not raw_weights.is_floating_point()
                                        or not torch.isfinite(raw_weights).all()):
            raise BodyIDFileError(f"{path}: view_weights is not a finite float vector; the file is damaged")
        weights = tuple(float(w) for w in raw_weights.tolist()) if raw_weights is not None else ()
        if weights and len(weights) != len(views):
            raise BodyIDFileError(f"{path}: {len(views)} views but {len(weights)} view weights; the file is damaged")
        try:
            return BodyID(c_body=c_body, logvar=logvar, views=tuple(views), view_weights=weights,
                          encoder_hash=metadata.get("bolid_encoder_hash", ""), extra=extra)
        except BoLIDError as exc:
            raise BodyIDFileError(f"{path}: {exc}") from exc


def sample_body_id(dim: int, seed: int, encoder_hash: str = "", temperature: float = 1.0,
                   distribution: tuple[torch.Tensor, torch.Tensor] | None = None) -> BodyID:
    """A new body, reproducible from ``seed`` on any device.

    ``distribution`` = (mean, Cholesky factor) of the training identities' posterior means, as stage 1 stores it
    with the encoder (``BodyEncoder.body_prior``): the draw is ``mean + temperature * L z``, a body like the ones
    the adapter was trained on. Without it the draw is ``temperature * z`` from the prior N(0, I), whose samples
    lie further from the origin than the (shrunk) posterior means the adapter saw."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    z = torch.randn(dim, generator=generator) * float(temperature)
    source = "prior"
    if distribution is not None:
        mean, tril = distribution
        if tuple(mean.shape) != (dim,) or tuple(tril.shape) != (dim, dim):
            raise ValueError(f"the body distribution has shapes {tuple(mean.shape)}, {tuple(tril.shape)}; "
                             f"expected ({dim},), ({dim}, {dim})")
        z = mean.float() + tril.float() @ z
        source = "training identities"
    return BodyID(c_body=z, views=(), view_weights=(), encoder_hash=encoder_hash,
                  extra={"source": source, "seed": int(seed), "temperature": float(temperature)})


def blend_body_ids(a: BodyID, b: BodyID, t: float, method: Literal["linear", "slerp"] = "linear") -> BodyID:
    """Interpolate two identities (t=0 -> a, t=1 -> b); they must come from the same encoder.

    ``slerp`` interpolates direction and norm separately, so a midpoint keeps the typical norm of prior samples
    (a linear midpoint of two independent N(0, I) draws has ~0.71x their norm, i.e. an atypical body).
    """
    if a.dim != b.dim:
        raise BodyIDMismatchError(f"cannot blend body IDs of {a.dim} and {b.dim} dims: they come from different "
                                  "encoders; encode both with the same Body-ID encoder")
    if a.encoder_hash and b.encoder_hash and a.encoder_hash != b.encoder_hash:
        raise BodyIDMismatchError(f"cannot blend body IDs of different encoders ({a.encoder_hash} vs "
                                  f"{b.encoder_hash}): their latent spaces are unrelated; re-encode with one")
    t = float(t)
    if method == "linear":
        c_body = torch.lerp(a.c_body, b.c_body, t)
    elif method == "slerp":
        na, nb = a.c_body.norm(), b.c_body.norm()
        ua, ub = a.c_body / na.clamp_min(1e-12), b.c_body / nb.clamp_min(1e-12)
        omega = torch.arccos((ua * ub).sum().clamp(-1.0, 1.0))
        if float(omega) < 1e-4 or math.isclose(float(omega), math.pi, abs_tol=1e-4):
            direction = torch.lerp(ua, ub, t)
            direction = direction / direction.norm().clamp_min(1e-12)
        else:
            direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
        c_body = direction * torch.lerp(na, nb, t)
    else:
        raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
    logvar = torch.lerp(a.logvar, b.logvar, t) if a.logvar is not None and b.logvar is not None else None
    views = a.views + b.views
    weights = tuple(w * (1 - t) for w in a.view_weights) + tuple(w * t for w in b.view_weights)
    if len(weights) != len(views):
        weights = ()
    return BodyID(c_body=c_body, logvar=logvar, views=views, view_weights=weights,
                  encoder_hash=a.encoder_hash or b.encoder_hash,
                  extra={"source": "blend", "t": t, "method": method})
