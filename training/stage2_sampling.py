"""Stage 2's training data: one person's cached views (:class:`Stage2Identity`), leave-one-out sampling with
condition dropout (:class:`SamplingConfig`, :class:`Stage2Data`, :func:`collate`), and an identity's condition
over all its views (:func:`identity_condition`, for validation and inference).

``body_mu``/``body_logvar`` are the frozen Body-ID encoder's per-view posteriors (``BodyEncoder.encode_views``);
c_body for a sample is :func:`bolid.body_encoder.aggregate_views` over the context views, which equals
``BodyEncoder.encode`` on those views exactly, so the encoder itself never runs during training. Experiments
that only have one c_body per view can pass it as ``body_mu`` with a very negative ``body_logvar``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bolid.appearance import APPEARANCE_DIM, aggregate_appearance
from bolid.body_encoder import aggregate_views
from bolid.identity import no_identity, no_identity_like
from bolid.proportions import aggregate_proportions, body_proportions
from training.stage2_components import EncodeText, Stage2Components, Stage2Error

logger = logging.getLogger("bolid")

FACE_SOURCES = ("other", "same", "mean_others")


@dataclass
class Stage2Identity:
    """One person's cached views. ``samples``: VAE latents (already scaled) or, for a pixel-space model, images in
    [-1, 1], each [C, h, w]; views with equal shapes form one aspect-ratio bucket."""

    name: str
    samples: list[torch.Tensor]
    captions: list[str]
    body_mu: torch.Tensor
    body_logvar: torch.Tensor
    body_weights: torch.Tensor
    keypoints: torch.Tensor
    face: torch.Tensor | None = None
    face_valid: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    appearance: torch.Tensor | None = None  # [n, 12] bolid.appearance descriptor per view (L_id ``appearance``)
    appearance_confidence: torch.Tensor | None = None
    proportions: torch.Tensor = field(init=False)
    proportion_confidence: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.samples)
        if n == 0 or len(self.captions) != n:
            raise Stage2Error(f"identity {self.name}: {n} samples but {len(self.captions)} captions")
        for label, t in (("body_mu", self.body_mu), ("body_logvar", self.body_logvar),
                         ("body_weights", self.body_weights), ("keypoints", self.keypoints)):
            if t.shape[0] != n:
                raise Stage2Error(f"identity {self.name}: {label} has {t.shape[0]} rows, expected {n} (one per view)")
        if self.face is not None:
            if self.face.shape != (n, self.face.shape[-1]):
                raise Stage2Error(f"identity {self.name}: face must be [{n}, 512], got {tuple(self.face.shape)}")
            if self.face_valid is None:
                self.face_valid = torch.ones(n, dtype=torch.bool)
        else:
            self.face_valid = torch.zeros(n, dtype=torch.bool)
        self.face_valid = self.face_valid.bool()
        if self.time_ids is not None and self.time_ids.shape != (n, 6):
            raise Stage2Error(f"identity {self.name}: time_ids must be [{n}, 6], got {tuple(self.time_ids.shape)}")
        if (self.appearance is None) != (self.appearance_confidence is None):
            raise Stage2Error(f"identity {self.name}: appearance and appearance_confidence come together")
        if self.appearance is not None and (self.appearance.shape != (n, APPEARANCE_DIM)
                                            or self.appearance_confidence.shape != (n, APPEARANCE_DIM)):
            raise Stage2Error(f"identity {self.name}: appearance must be [{n}, {APPEARANCE_DIM}], got "
                              f"{tuple(self.appearance.shape)} / {tuple(self.appearance_confidence.shape)}")
        props, conf = body_proportions(self.keypoints.double())
        self.proportions, self.proportion_confidence = props.float(), conf.float()

    @property
    def num_views(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class SamplingConfig:
    """Leave-one-out sampling and condition dropout.

    max_context_views: c_body aggregates 1..this many of the OTHER photos. face_source: "other" (the face
    embedding of another photo of the same person, the default), "same" (the target's own face) or "mean_others"
    (normalised mean over all other photos). id_reference: "context" (L_id's reference proportions are aggregated
    over the same context views as c_body) or "all" (over every view of the identity). Dropout probabilities are
    exclusive events per sample: text only, face only, body only, everything.
    """

    max_context_views: int = 4
    face_source: str = "other"
    id_reference: str = "context"
    drop_text: float = 0.05
    drop_face: float = 0.05
    drop_body: float = 0.05
    drop_all: float = 0.05
    prior_expert: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.face_source not in FACE_SOURCES:
            raise Stage2Error(f"face_source must be one of {FACE_SOURCES}, got {self.face_source!r}")
        if self.id_reference not in ("context", "all"):
            raise Stage2Error(f"id_reference must be 'context' or 'all', got {self.id_reference!r}")
        probs = (self.drop_text, self.drop_face, self.drop_body, self.drop_all)
        if min(probs) < 0 or sum(probs) > 1:
            raise Stage2Error(f"dropout probabilities must be >= 0 and sum to <= 1, got {probs}")
        if self.max_context_views < 1:
            raise Stage2Error("max_context_views must be >= 1")


DROP_KINDS = ("none", "text", "face", "body", "all")


class Stage2Data:
    """Deterministic leave-one-out batches: ``batch(index, batch_size)`` depends only on (seed, index).

    A batch is drawn from one aspect-ratio bucket (views with the same sample shape), picked with probability
    proportional to its number of usable targets. Text embeddings of every caption (and of the empty caption used
    when text is dropped) are cached once, with ``components.encode_text`` unless ``text_cache`` already has them.
    """

    def __init__(self, identities: Sequence[Stage2Identity], sampling: SamplingConfig | None = None,
                 components: Stage2Components | None = None,
                 text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
        self.sampling = sampling or SamplingConfig()
        usable = [ident for ident in identities if ident.num_views >= 2]
        if not usable:
            raise Stage2Error("no identity has 2 or more views: leave-one-out needs a held-out target per identity")
        dropped = [ident.name for ident in identities if ident.num_views < 2]
        if dropped:
            logger.warning("BoLID stage 2: identities with a single view are not used: %s", dropped)
        self.identities = list(usable)
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = dict(text_cache or {})
        captions = sorted({c for ident in self.identities for c in ident.captions} | {""})
        missing = [c for c in captions if c not in self.text_cache]
        if missing:
            if components is None or components.encode_text is None:
                raise Stage2Error(f"{len(missing)} captions have no cached text embedding and no encode_text was "
                                  f"given (e.g. {missing[0]!r})")
            self.cache_text(missing, components.encode_text)
        buckets: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, ident in enumerate(self.identities):
            for j, s in enumerate(ident.samples):
                buckets.setdefault(tuple(s.shape), []).append((i, j))
        self.bucket_keys = sorted(buckets)
        self.buckets = [buckets[k] for k in self.bucket_keys]
        sizes = np.array([len(b) for b in self.buckets], dtype=np.float64)
        self.bucket_probs = sizes / sizes.sum()

    @torch.no_grad()
    def cache_text(self, captions: Sequence[str], encode_text: EncodeText, chunk: int = 16) -> None:
        captions = list(captions)
        for start in range(0, len(captions), chunk):
            part = captions[start:start + chunk]
            embeds, pooled = encode_text(part)
            for k, c in enumerate(part):
                self.text_cache[c] = (embeds[k].detach().cpu(), None if pooled is None else pooled[k].detach().cpu())

    @property
    def num_views(self) -> int:
        return sum(ident.num_views for ident in self.identities)

    def describe(self) -> dict[str, Any]:
        return {"identities": len(self.identities), "views": self.num_views,
                "buckets": {"x".join(str(d) for d in k): len(b) for k, b in zip(self.bucket_keys, self.buckets,
                                                                                 strict=True)}}

    def _drop_kind(self, rng: np.random.Generator) -> str:
        s = self.sampling
        u = rng.random()
        for kind, p in zip(DROP_KINDS[1:], (s.drop_text, s.drop_face, s.drop_body, s.drop_all), strict=True):
            if u < p:
                return kind
            u -= p
        return "none"

    def _face(self, ident: Stage2Identity, target: int, rng: np.random.Generator) -> tuple[torch.Tensor | None, int]:
        """(face embedding, source view index or -1)."""
        if ident.face is None:
            return None, -1
        valid = ident.face_valid
        src = self.sampling.face_source
        if src == "same":
            return (ident.face[target], target) if valid[target] else (None, -1)
        others = [k for k in range(ident.num_views) if k != target and bool(valid[k])]
        if not others:
            return None, -1
        if src == "mean_others":
            return F.normalize(ident.face[others].float().mean(0), dim=-1), -1
        k = others[int(rng.integers(len(others)))]
        return ident.face[k], k

    def body_views(self, context: list[int], target: int) -> list[int]:
        """The views c_body is aggregated over: the context, never the target (leave-one-out). The experiment's
        target-in-context ablation overrides this and nothing else, so both draw the same samples."""
        return context

    def sample(self, rng: np.random.Generator, bucket: int) -> dict[str, Any]:
        """One leave-one-out sample from ``bucket`` (tensors of one row, plus the indices used)."""
        i, j = self.buckets[bucket][int(rng.integers(len(self.buckets[bucket])))]
        ident = self.identities[i]
        n = ident.num_views
        others = [k for k in range(n) if k != j]
        k = int(rng.integers(1, min(self.sampling.max_context_views, n - 1) + 1))
        context = sorted(int(c) for c in rng.choice(others, size=k, replace=False))
        body_rows = self.body_views(context, j)
        mu, _ = aggregate_views(ident.body_mu[body_rows].float(), ident.body_logvar[body_rows].float(),
                                ident.body_weights[body_rows].float(), self.sampling.prior_expert)
        face, face_index = self._face(ident, j, rng)
        ref_rows = context if self.sampling.id_reference == "context" else list(range(n))
        ref_props, ref_conf = aggregate_proportions(ident.proportions[ref_rows], ident.proportion_confidence[ref_rows])
        if ident.appearance is not None:
            ref_app, ref_app_conf = aggregate_appearance(ident.appearance[ref_rows].float(),
                                                         ident.appearance_confidence[ref_rows].float())
        else:
            ref_app = ref_app_conf = torch.zeros(APPEARANCE_DIM)
        drop = self._drop_kind(rng)
        caption = ident.captions[j]
        text_key = "" if drop in ("text", "all") else caption
        embeds, pooled = self.text_cache[text_key]
        face_dim = ident.face.shape[-1] if ident.face is not None else 512
        face_t = no_identity(face_dim) if face is None or drop in ("face", "all") else face.float()
        body_t = no_identity_like(mu) if drop in ("body", "all") else mu
        return {"sample": ident.samples[j], "text_embeds": embeds, "pooled": pooled,
                "time_ids": None if ident.time_ids is None else ident.time_ids[j],
                "face": face_t, "body": body_t, "caption": caption, "drop": drop,
                "ref_keypoints": ident.keypoints[j].float(), "ref_props": ref_props, "ref_prop_conf": ref_conf,
                "ref_appearance": ref_app, "ref_app_conf": ref_app_conf,
                "identity_index": i, "target_index": j, "context_indices": context, "face_index": face_index}

    def batch(self, index: int, batch_size: int) -> dict[str, Any]:
        """Batch number ``index`` (a pure function of (seed, index))."""
        rng = np.random.default_rng([self.sampling.seed, int(index)])
        bucket = int(rng.choice(len(self.buckets), p=self.bucket_probs))
        rows = [self.sample(rng, bucket) for _ in range(batch_size)]
        return collate(rows)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([r[key] for r in rows])
        elif value is None:
            out[key] = None
        else:
            out[key] = [r[key] for r in rows]
    lengths = {r["text_embeds"].shape[0] for r in rows}
    if len(lengths) > 1:
        raise Stage2Error(f"cached text embeddings have different lengths {sorted(lengths)}; pad captions to one length")
    out["body_present"] = torch.tensor([r["drop"] not in ("body", "all") for r in rows])
    out["text_present"] = torch.tensor([r["drop"] not in ("text", "all") and bool(r["caption"]) for r in rows])
    return out


def identity_condition(ident: Stage2Identity, prior_expert: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mean face embedding or None, c_body over all views) of an identity, for validation and inference."""
    mu, _ = aggregate_views(ident.body_mu.float(), ident.body_logvar.float(), ident.body_weights.float(),
                            prior_expert)
    face = None
    if ident.face is not None and bool(ident.face_valid.any()):
        face = F.normalize(ident.face[ident.face_valid].float().mean(0), dim=-1)
    return face, mu

