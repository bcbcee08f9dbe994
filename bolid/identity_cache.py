"""A prepared dataset cache as training reads it: one identity's cache, the identity targets' statistics, and
the stage-1 sampler (leave-one-out view sets, seeded per sample, so a resumed run sees the same batches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .appearance import aggregate_appearance, appearance_descriptor
from .body_views import views_to_tensor
from .dataset import CACHE_KIND, INDEX_FILE, DatasetCacheError
from .keypoints import flip_index
from .safetensors_io import load_safetensors


@dataclass
class IdentityCache:
    """One identity's cache with small tensors in memory; crops are read row by row from the file."""

    path: Path
    identity: str
    files: list[str]
    captions: list[str]
    keypoints: torch.Tensor
    weights: torch.Tensor
    proportions: torch.Tensor
    proportion_confidence: torch.Tensor
    appearance: torch.Tensor  # bolid.appearance descriptor of the identity (mean over its photos)
    appearance_confidence: torch.Tensor

    @property
    def num_views(self) -> int:
        return len(self.files)


PRELOAD_BYTES = 512 * 2**20  # Stage1Dataset keeps every crop in memory when they take at most this


def _crops_fit(caches: Sequence[IdentityCache], budget: int) -> bool:
    """Whether all crops (uint8, as stored) take at most ``budget`` bytes; stops reading headers once over."""
    total = 0
    for cache in caches:
        with safe_open(str(cache.path), framework="pt") as f:
            total += int(np.prod(f.get_slice("crops").get_shape()))  # uint8: one byte each
        if total > budget:
            return False
    return True


def _read_crops_uint8(cache: IdentityCache) -> torch.Tensor:
    with safe_open(str(cache.path), framework="pt") as f:
        return f.get_tensor("crops")


def read_identity_crops(cache: IdentityCache) -> torch.Tensor:
    """All crops of one identity as float [V, 3, S, S] in 0..1."""
    return _read_crops_uint8(cache).permute(0, 3, 1, 2).float() / 255.0


def identity_target_statistics(identities: Sequence[IdentityCache]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread over people of the identity targets (proportions, then appearance), each value weighted
    by its confidence: the standardisation that makes stage 1's heads scale-free (see BodyEncoderConfig)."""
    targets = torch.stack([torch.cat([c.proportions, c.appearance]) for c in identities]).double()
    conf = torch.stack([torch.cat([c.proportion_confidence, c.appearance_confidence]) for c in identities]).double()
    w = conf / conf.sum(0).clamp_min(1e-9)
    mean = (w * targets).sum(0)
    std = ((w * (targets - mean) ** 2).sum(0)).sqrt().clamp_min(1e-3)
    return mean.float(), std.float()


def read_cache_index(index_path: Path, prepare: str = "python training/train.py --config <config> --prepare-only"
                     ) -> list[dict[str, Any]]:
    """The ``identities`` list of a cache's index file; a missing or damaged index says how to rebuild it."""
    if not index_path.is_file():
        raise DatasetCacheError(f"{index_path} not found: run the prepare step first ({prepare})")
    try:
        return json.loads(index_path.read_text())["identities"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetCacheError(f"{index_path} is damaged ({type(exc).__name__}: {exc}); run prepare again "
                                f"({prepare})") from exc


def load_identity_caches(cache_dir: str | os.PathLike) -> list[IdentityCache]:
    """The identities listed in ``cache_dir/index.json`` (written by :func:`prepare_dataset`)."""
    cache = Path(cache_dir)
    entries = read_cache_index(cache / INDEX_FILE)
    out = []
    for e in entries:
        path = cache / e["file"]
        tensors, meta = load_safetensors(path, DatasetCacheError)
        if meta.get("bolid_kind") != CACHE_KIND:
            raise DatasetCacheError(f"{path}: not a BoLID stage-1 cache file; delete it and run prepare again")
        keypoints = tensors["keypoints"].float()
        desc, desc_conf = appearance_descriptor(tensors["crops"].permute(0, 3, 1, 2).float() / 255.0, keypoints)
        appearance, appearance_conf = aggregate_appearance(desc, desc_conf * tensors["weights"].float()[:, None])
        out.append(IdentityCache(path, meta.get("identity", e["key"]), json.loads(meta["files"]),
                                 json.loads(meta.get("captions", "[]")), keypoints,
                                 tensors["weights"].float(), tensors["proportions"].float(),
                                 tensors["proportion_confidence"].float(), appearance, appearance_conf))
    return out


class Stage1Dataset(torch.utils.data.Dataset):
    """Leave-one-out view sets: item i = (1..max_context_views context views, one held-out target) of one
    identity, all chosen by a generator seeded with (seed, i).

    The length is virtual (``num_samples``): the content of sample i never depends on anything but (seed, i),
    so a resumed run (which skips the first batches) sees exactly the batches an uninterrupted run would, with
    any number of data-loader workers or processes.
    """

    def __init__(self, identities: Sequence[IdentityCache], num_samples: int, max_context_views: int = 4,
                 seed: int = 0, flip: bool = True, preload_bytes: int = PRELOAD_BYTES) -> None:
        usable = [c for c in identities if c.num_views >= 2]
        if not usable:
            raise DatasetCacheError("no identity has 2 or more usable photos; the stage-1 objective needs a "
                                    "held-out view per identity (check prepare_report.json)")
        self.identities = usable
        self.num_samples = int(num_samples)
        self.max_context_views = int(max_context_views)
        self.seed = int(seed)
        self.flip = bool(flip)
        self._flip_index = torch.from_numpy(flip_index())
        # a small dataset's crops stay in memory (uint8, as stored): reading them row by row from the files was a
        # fifth of a stage-1 step on a small model; a large one is read per sample as before
        self._preloaded: list[torch.Tensor] | None = None
        if preload_bytes > 0 and _crops_fit(usable, preload_bytes):
            self._preloaded = [_read_crops_uint8(c) for c in usable]

    def __len__(self) -> int:
        return self.num_samples

    def _crops(self, which: int, cache: IdentityCache, rows: list[int]) -> torch.Tensor:
        """Views ``rows`` of identity number ``which`` (``cache``) as float [len(rows), 3, S, S]."""
        if self._preloaded is not None:
            return views_to_tensor(self._preloaded[which][rows])
        with safe_open(str(cache.path), framework="pt") as f:
            sl = f.get_slice("crops")
            crops = torch.stack([sl[r : r + 1][0] for r in rows])
        return views_to_tensor(crops)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        which = int(rng.integers(len(self.identities)))
        cache = self.identities[which]
        n = cache.num_views
        k = int(rng.integers(1, min(self.max_context_views, n - 1) + 1))
        rows = [int(r) for r in rng.permutation(n)[: k + 1]]
        flips = rng.random(k + 1) < 0.5 if self.flip else np.zeros(k + 1, dtype=bool)
        crops = self._crops(which, cache, rows)
        kps = cache.keypoints[rows].clone()
        for j in np.nonzero(flips)[0]:
            crops[j] = crops[j].flip(-1)
            kps[j] = kps[j][self._flip_index]
            kps[j, :, 0] = 1.0 - kps[j, :, 0]
        return {"context_crops": crops[1:], "context_keypoints": kps[1:], "context_weights": cache.weights[rows[1:]],
                "target_crop": crops[0], "target_keypoints": kps[0], "proportions": cache.proportions,
                "proportion_confidence": cache.proportion_confidence, "appearance": cache.appearance,
                "appearance_confidence": cache.appearance_confidence}


def stage1_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items, padding the context views to the batch's largest set with weight-0 (ignored) views."""
    v = max(it["context_crops"].shape[0] for it in items)
    out: dict[str, torch.Tensor] = {}
    for key in ("context_crops", "context_keypoints", "context_weights"):
        padded = []
        for it in items:
            t = it[key]
            pad = torch.zeros((v - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            padded.append(torch.cat([t, pad]))
        out[key] = torch.stack(padded)
    for key in ("target_crop", "target_keypoints", "proportions", "proportion_confidence", "appearance",
                "appearance_confidence"):
        out[key] = torch.stack([it[key] for it in items])
    return out
