"""Face ID files and combinations: a face identity kept like a body identity (save, load, blend, weighted average).

A Face ID file is a small safetensors file: tensor ``embedding`` (float32 [512], the averaged, L2-normalised
ArcFace embedding) and optional ``photo_weights`` (float64); metadata holds the kind, format version, dim, the
recogniser it came from (``source``), the photos (JSON) and the number of images, so a loader can check it before
reading tensors. Names follow the Body ID rules and writes are atomic (bolid.body_id_io, bolid.safetensors_io).
Pickled embeds (as other packs save them) are never read.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .body_id_io import identity_file_path, refuse_overwrite
from .errors import BoLIDError
from .file_kinds import FACE_ID, read_file_kind
from .identity import FaceEmbeds
from .safetensors_io import atomic_save_safetensors, load_safetensors

logger = logging.getLogger("bolid")

FACE_ID_FORMAT_VERSION = 1


class FaceIDFileError(BoLIDError):
    """A Face ID file is missing, damaged, of another kind, or a name is unusable."""


class FaceIDMismatchError(BoLIDError):
    """Two face identities cannot be combined (different embedding sizes)."""


class FaceWeightsError(BoLIDError):
    """Per-photo face weights do not fit the photos (count, sign, all zero)."""


def face_id_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name.safetensors`` for a Face ID name; the same rules as Body ID names."""
    return identity_file_path(folder, name, "face ID", FaceIDFileError)


def save_face_id(face: FaceEmbeds, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``face`` atomically; an existing file is an error unless ``overwrite``."""
    path = Path(path)
    refuse_overwrite(path, overwrite, FaceIDFileError)
    tensors = {"embedding": face.embedding.to(torch.float32)}
    if face.photo_weights:
        tensors["photo_weights"] = torch.tensor(face.photo_weights, dtype=torch.float64)
    metadata = {"bolid_kind": FACE_ID, "bolid_format_version": str(FACE_ID_FORMAT_VERSION),
                "bolid_face_dim": str(int(face.embedding.numel())), "bolid_source": face.source,
                "bolid_num_images": str(int(face.num_images)), "bolid_photos": json.dumps(list(face.photos))}
    atomic_save_safetensors(tensors, path, metadata)
    return path


def load_face_id(path: str | os.PathLike) -> FaceEmbeds:
    """Read a Face ID file written by :func:`save_face_id`, checking kind, version, shapes and the norm."""
    path = Path(path)
    metadata, _ = read_file_kind(path, FACE_ID, (FACE_ID_FORMAT_VERSION,), FaceIDFileError)
    tensors, _ = load_safetensors(path, FaceIDFileError)
    try:
        dim = int(metadata["bolid_face_dim"])
        photos = tuple(json.loads(metadata.get("bolid_photos", "[]")))
        num_images = int(metadata.get("bolid_num_images", "1"))
    except (KeyError, ValueError, TypeError) as exc:
        raise FaceIDFileError(f"{path}: invalid face ID metadata ({exc})") from exc
    emb = tensors.get("embedding")
    if emb is None or tuple(emb.shape) != (dim,):
        raise FaceIDFileError(f"{path}: embedding missing or not a vector of {dim} values; the file is damaged")
    if not torch.isfinite(emb).all() or not math.isclose(float(emb.norm()), 1.0, abs_tol=1e-3):
        raise FaceIDFileError(f"{path}: the embedding is not a unit vector; the file is damaged")
    weights = tuple(float(w) for w in tensors["photo_weights"].tolist()) if "photo_weights" in tensors else ()
    if weights and len(weights) != len(photos):
        raise FaceIDFileError(f"{path}: {len(photos)} photos but {len(weights)} photo weights; the file is damaged")
    return FaceEmbeds(embedding=emb, num_images=num_images, source=metadata.get("bolid_source", ""),
                      photos=photos, photo_weights=weights)


def parse_photo_weights(text: str, count: int) -> list[float]:
    """"1, 0.5, 2" -> one weight per photo (empty text: all 1). Errors say what to fix."""
    text = (text or "").strip()
    if not text:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError as exc:
        raise FaceWeightsError(f"photo weights {text!r}: write numbers separated by commas, one per photo "
                               f"({count} photos)") from exc
    if len(weights) != count:
        raise FaceWeightsError(f"photo weights {text!r} give {len(weights)} weight(s) for {count} photo(s): write "
                               "one per photo, in the order of the photos (or leave it empty for equal weights)")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise FaceWeightsError(f"photo weights {text!r}: each must be >= 0 and at least one > 0")
    return weights


def weighted_face_average(embeddings: Sequence[np.ndarray | torch.Tensor], weights: Sequence[float],
                          photos: Sequence[str] = (), source: str = "") -> FaceEmbeds:
    """Weighted mean of L2-normalised embeddings, renormalised (equal weights: the plain average of Encode Face).

    Why weights: a sharp frontal photo should count more than a blurred profile when several are averaged.
    """
    if len(embeddings) != len(weights) or not embeddings:
        raise FaceWeightsError(f"{len(embeddings)} embeddings but {len(weights)} weights")
    stack = torch.stack([torch.as_tensor(np.asarray(e, dtype=np.float32)).ravel() for e in embeddings])
    stack = stack / stack.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if (w < 0).any() or float(w.sum()) <= 0:
        raise FaceWeightsError("face photo weights must be >= 0 and at least one > 0")
    mean = (w[:, None] * stack).sum(0) / w.sum()
    norm = float(mean.norm())
    if norm < 1e-6:
        raise BoLIDError("the face embeddings cancel out (opposite directions): these photos are not one person")
    used = int((w > 0).sum())
    return FaceEmbeds(embedding=mean / norm, num_images=used, source=source, photos=tuple(photos),
                      photo_weights=tuple(float(x) for x in weights) if photos else ())


def blend_face_ids(a: FaceEmbeds, b: FaceEmbeds, t: float, method: Literal["linear", "slerp"] = "slerp"
                   ) -> FaceEmbeds:
    """Interpolate two face identities (t=0 -> a, t=1 -> b); the result is a unit vector like every face embed.

    ``slerp`` follows the unit sphere ArcFace embeddings live on; ``linear`` mixes, then renormalises.
    """
    if a.embedding.numel() != b.embedding.numel():
        raise FaceIDMismatchError(f"cannot blend face IDs of {a.embedding.numel()} and {b.embedding.numel()} "
                                  "values: they come from different recognisers; encode both with one face model")
    if a.source and b.source and a.source != b.source:
        logger.warning("BoLID: blending face IDs from different recognisers (%s, %s): their embeddings may not be "
                       "comparable", a.source, b.source)
    t = float(t)
    ua = a.embedding / a.embedding.norm().clamp_min(1e-12)
    ub = b.embedding / b.embedding.norm().clamp_min(1e-12)
    if method == "linear":
        mixed = torch.lerp(ua, ub, t)
    elif method == "slerp":
        omega = torch.arccos((ua * ub).sum().clamp(-1.0, 1.0))
        if math.pi - float(omega) < 1e-4:
            raise BoLIDError("the two face identities are opposite: no unique path between them; use linear")
        if float(omega) < 1e-4:
            mixed = torch.lerp(ua, ub, t)
        else:
            mixed = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    else:
        raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
    norm = float(mixed.norm())
    if norm < 1e-6:
        raise BoLIDError("the two face identities are opposite: their midpoint has no direction; use another t")
    photos = a.photos + b.photos
    weights = tuple(w * (1 - t) for w in a.photo_weights) + tuple(w * t for w in b.photo_weights)
    return FaceEmbeds(embedding=mixed / norm, num_images=a.num_images + b.num_images,
                      source=a.source if a.source == b.source else f"{a.source}+{b.source}", photos=photos,
                      photo_weights=weights if len(weights) == len(photos) else ())
