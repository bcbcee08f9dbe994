"""The identity values that flow between nodes: a face embedding and a body identity (c_body)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import AdapterConfig
from .errors import EmbeddingError


def _as_vector(value: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{what} must be a tensor, got {type(value).__name__}")
    value = value.detach().float().cpu()
    if value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1 or value.numel() == 0:
        raise EmbeddingError(f"{what} must be one vector, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise EmbeddingError(f"{what} contains NaN or Inf values")
    return value


@dataclass(frozen=True)
class FaceEmbeds:
    """Averaged, L2-normalised ArcFace embedding of one person (socket type BOLID_FACE_EMBEDS)."""

    embedding: torch.Tensor
    num_images: int = 1
    source: str = ""
    # provenance (optional): the photos averaged and their weights, as Body IDs keep their views
    photos: tuple[str, ...] = ()
    photo_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "embedding", _as_vector(self.embedding, "face embedding"))

    @classmethod
    def from_tensor(cls, embedding: torch.Tensor, source: str = "tensor") -> FaceEmbeds:
        return cls(embedding=embedding, num_images=1, source=source)


@dataclass(frozen=True)
class BodyID:
    """A body identity c_body plus its provenance (socket type BOLID_BODY_ID).

    ``logvar`` is the aggregated posterior's log-variance when the identity came from the encoder;
    ``views``/``view_weights`` name the images used and their aggregation weights.
    """

    c_body: torch.Tensor
    logvar: torch.Tensor | None = None
    views: tuple[str, ...] = ()
    view_weights: tuple[float, ...] = ()
    encoder_hash: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "c_body", _as_vector(self.c_body, "body identity c_body"))
        if self.logvar is not None:
            object.__setattr__(self, "logvar", _as_vector(self.logvar, "body identity logvar"))

    @property
    def dim(self) -> int:
        return int(self.c_body.numel())

    @classmethod
    def from_tensor(cls, c_body: torch.Tensor) -> BodyID:
        return cls(c_body=c_body)


# ------------------------------------------------------------------------------------ the "no identity" rule


def no_identity(dim: int, rows: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """THE condition of a branch without an identity: the zero embedding ([dim], or [rows, dim]; float32).

    One rule wherever a face or body is absent: training's condition dropout and photos without a detected face,
    the unconditional half of classifier-free guidance, and an unconnected branch at inference, so body-only and
    face-only runs see what the adapter saw in training.
    """
    return torch.zeros(dim if rows is None else (rows, dim), device=device)


def no_identity_like(embeds: torch.Tensor) -> torch.Tensor:
    """:func:`no_identity` rows shaped like ``embeds`` (same dtype and device), e.g. the uncond rows of CFG."""
    return torch.zeros_like(embeds)


def complete_identity(config: AdapterConfig, face: torch.Tensor | None, body: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both branches' conditions from the one(s) given: a missing branch gets :func:`no_identity` rows (as many
    as the given branch has, on its device); the body only when the adapter has a body branch."""
    given = face if face is not None else body
    if given is None:
        raise ValueError("complete_identity needs a face or a body condition")
    rows = 1 if given.ndim == 1 else given.shape[0]
    if face is None:
        face = no_identity(config.face_embed_dim, rows, given.device)
    if body is None and config.body_branch:
        body = no_identity(config.body_dim, rows, given.device)
    return face, body
