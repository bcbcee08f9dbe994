"""Identity-folder datasets (kohya-like TOML): the ``[dataset]`` table, the folders it names, the cache format.

Layout on disk: ``<root>/<identity>/*.jpg|jpeg|png|webp`` with optional ``<image stem>.txt`` captions. The
``[dataset]`` table of a training config names one or more subsets (roots) and the filters. The prepare step
(:mod:`bolid.dataset_prepare`) turns them into a per-identity cache once; :mod:`bolid.identity_cache` reads it
for training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import BoLIDError
from .keypoints import SEVERAL_PEOPLE_RATIO

logger = logging.getLogger("bolid")


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
CACHE_FORMAT_VERSION = 1
CACHE_KIND = "bolid_stage1_cache"
INDEX_FILE = "index.json"
REPORT_FILE = "prepare_report.json"


class DatasetConfigError(BoLIDError):
    """The [dataset] table is invalid, or a folder it names does not exist."""


class DatasetCacheError(BoLIDError):
    """The prepared cache is missing, damaged or too small to train on."""


@dataclass(frozen=True)
class SubsetConfig:
    """One root folder whose sub-folders are identities. ``identities`` restricts to the named sub-folders;
    ``min_resolution`` overrides the dataset's filter for this root."""

    root: str
    identities: tuple[str, ...] = ()
    min_resolution: int | None = None
    caption_extension: str | None = None


@dataclass(frozen=True)
class DatasetConfig:
    """The ``[dataset]`` table. min_resolution: shortest image side in px (the paper kept >= 1000 px photos).
    multi_person_ratio: an image is skipped as "several people" when a second person's box is at least this
    fraction of the largest one's area (small background people are ignored). min_views: identities need at
    least this many usable photos (one is held out as the decoder's target)."""

    cache_dir: str
    subsets: tuple[SubsetConfig, ...]
    min_resolution: int = 1000
    crop_size: int = 128
    min_confidence: float = 0.3
    multi_person_ratio: float = SEVERAL_PEOPLE_RATIO
    min_views: int = 2
    max_context_views: int = 4
    caption_extension: str = ".txt"
    flip: bool = True
    batch_size_pose: int = 8

    def __post_init__(self) -> None:
        if not self.subsets:
            raise DatasetConfigError("[dataset] needs at least one [[dataset.subsets]] entry with a root folder")
        if self.min_views < 2:
            raise DatasetConfigError("[dataset] min_views must be >= 2 (one view is held out as the target)")
        if self.max_context_views < 1 or self.crop_size < 8 or self.min_resolution < 1:
            raise DatasetConfigError("[dataset] max_context_views >= 1, crop_size >= 8, min_resolution >= 1")


def dataset_config_from_dict(raw: dict[str, Any], base_dir: str | os.PathLike = ".") -> DatasetConfig:
    """Build a DatasetConfig from the TOML ``[dataset]`` table; relative paths are relative to ``base_dir``."""
    raw = dict(raw)
    known = {f.name for f in fields(DatasetConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DatasetConfigError(f"[dataset] has unknown keys {unknown}; known keys: {sorted(known)}")
    if "cache_dir" not in raw:
        raise DatasetConfigError("[dataset] needs cache_dir (where the prepared keypoints and crops go)")
    base = Path(base_dir)
    subsets = []
    sub_known = {f.name for f in fields(SubsetConfig)}
    for i, sub in enumerate(raw.pop("subsets", [])):
        bad = sorted(set(sub) - sub_known)
        if bad or "root" not in sub:
            raise DatasetConfigError(f"[[dataset.subsets]] #{i + 1}: needs 'root', unknown keys {bad}")
        sub = dict(sub)
        sub["root"] = str((base / sub["root"]).resolve())
        sub["identities"] = tuple(sub.get("identities", ()))
        subsets.append(SubsetConfig(**sub))
    raw["cache_dir"] = str((base / raw["cache_dir"]).resolve())
    try:
        return DatasetConfig(subsets=tuple(subsets), **raw)
    except TypeError as exc:
        raise DatasetConfigError(f"[dataset]: {exc}") from exc


def _identity_key(root: Path, identity: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", identity)[:64] or "identity"
    return f"{safe}-{hashlib.sha256(str(root / identity).encode()).hexdigest()[:8]}"


def list_identities(config: DatasetConfig) -> list[tuple[str, str, SubsetConfig, list[Path]]]:
    """(key, identity name, subset, sorted image paths) for every identity folder in the config."""
    out = []
    for subset in config.subsets:
        root = Path(subset.root)
        if not root.is_dir():
            raise DatasetConfigError(f"dataset root {root} does not exist or is not a folder")
        names = subset.identities or tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        for name in names:
            folder = root / name
            if not folder.is_dir():
                raise DatasetConfigError(f"identity folder {folder} (listed in the config) does not exist")
            images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            out.append((_identity_key(root, name), name, subset, images))
    return out


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A photo as uint8 RGB [H, W, 3], EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def config_summary(config: DatasetConfig) -> dict[str, Any]:
    """Flat, JSON-friendly view of the dataset config (for logs and exported metadata)."""
    d = asdict(config)
    d["subsets"] = [s["root"] for s in d["subsets"]]
    return d
