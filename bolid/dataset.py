"""Identity-folder datasets (kohya-like TOML), the one-time pose/crop cache, and the stage-1 sampler.

Layout on disk: ``<root>/<identity>/*.jpg|jpeg|png|webp`` with optional ``<image stem>.txt`` captions. The
``[dataset]`` table of a training config names one or more subsets (roots) and the filters. :func:`prepare_dataset`
runs the pose model once per image and writes one safetensors cache per identity (crops as uint8, keypoints,
confidences; file names and captions in the metadata), so training never touches the photos or the pose model.
Every skipped image is logged with its reason and listed in ``prepare_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open

from .appearance import aggregate_appearance, appearance_descriptor
from .body_views import person_view, views_to_tensor
from .errors import BoLIDError
from .keypoints import SEVERAL_PEOPLE_RATIO, PersonPose, choose_person, detect_people, flip_index
from .proportions import aggregate_proportions, body_proportions
from .safetensors_io import atomic_save_safetensors, atomic_write_text, load_safetensors, read_safetensors_metadata

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


# ----------------------------------------------------------------------------------------------- prepare


@dataclass
class PrepareReport:
    """What the prepare step did. ``skipped`` lists (image path, reason) for every image left out."""

    identities: dict[str, int] = field(default_factory=dict)  # identity key -> usable views
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dropped_identities: list[tuple[str, str]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    captions: dict[str, int] = field(default_factory=lambda: {"file": 0, "model": 0, "none": 0})  # over usable views

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        logger.warning("BoLID prepare: skipped %s: %s", path, reason)


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


def _fingerprint(settings: dict[str, Any], files: Sequence[Path]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_dataset(config: DatasetConfig, pose_runner: Any, crop_margin: float = 1.15,
                    progress: Callable[[int, int], None] | None = None,
                    model_captions: Mapping[str, str] | None = None) -> PrepareReport:
    """Run the pose model once over every image and cache crops + keypoints per identity (safetensors).

    ``model_captions`` maps a photo's path (``str``) to a caption made by a captioning model: it is used instead
    of the photo's caption file (the caller decides which photos get one, e.g. only those without a file).

    Skips, each logged with the image path: unreadable file, shortest side below min_resolution, no person,
    several people, body keypoint confidence below min_confidence. An identity left with fewer than min_views
    usable photos is dropped. An identity whose photos and settings did not change is reused as cached.
    """
    cache = Path(config.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    report = PrepareReport()
    index = []
    identities = list_identities(config)
    runner_name = str(getattr(pose_runner, "fingerprint", None) or type(pose_runner).__name__)
    for n, (key, name, subset, images) in enumerate(identities):
        min_res = subset.min_resolution or config.min_resolution
        cap_ext = subset.caption_extension or config.caption_extension
        captions = [p.with_suffix(cap_ext) for p in images]
        settings = {"crop_size": config.crop_size, "margin": crop_margin, "min_resolution": min_res,
                    "min_confidence": config.min_confidence, "multi": config.multi_person_ratio,
                    "pose": runner_name, "version": CACHE_FORMAT_VERSION}
        given = {p.name: model_captions[str(p)] for p in images if model_captions and str(p) in model_captions}
        if given:  # only then, so caches of datasets without model captions stay valid
            settings["model_captions"] = hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()
        fingerprint = _fingerprint(settings, images + [c for c in captions if c.is_file()])
        out_path = cache / f"{key}.safetensors"
        dropped_path = cache / f"{key}.dropped.json"
        if _reuse_dropped(dropped_path, fingerprint, report):
            if progress:
                progress(n + 1, len(identities))
            continue
        reused = _reuse_cache(out_path, fingerprint, report)
        if reused is not None:
            report.reused.append(key)
            report.identities[key] = reused
            index.append({"key": key, "identity": name, "file": out_path.name, "views": reused})
            if progress:
                progress(n + 1, len(identities))
            continue
        first_skip = len(report.skipped)
        views = _prepare_identity(config, pose_runner, images, min_res, crop_margin, report)
        if len(views) < config.min_views:
            why = f"only {len(views)} usable photo(s), at least {config.min_views} needed"
            report.dropped_identities.append((str(Path(subset.root) / name), why))
            logger.warning("BoLID prepare: dropped identity %s: %s", Path(subset.root) / name, why)
            if out_path.exists():
                out_path.unlink()
            # remembered, so an unchanged folder is not run through the pose model again
            atomic_write_text(dropped_path, json.dumps({"fingerprint": fingerprint,
                                                        "folder": str(Path(subset.root) / name), "reason": why,
                                                        "skipped": report.skipped[first_skip:]}))
        else:
            dropped_path.unlink(missing_ok=True)
            _write_identity_cache(out_path, name, views, captions, fingerprint, report.skipped[first_skip:],
                                  crop_margin, given, report)
            report.identities[key] = len(views)
            index.append({"key": key, "identity": name, "file": out_path.name, "views": len(views)})
        if progress:
            progress(n + 1, len(identities))
    atomic_write_text(cache / INDEX_FILE, json.dumps({"identities": index}, indent=1))
    atomic_write_text(cache / REPORT_FILE, json.dumps(
        {"identities": report.identities, "skipped": report.skipped, "dropped_identities": report.dropped_identities,
         "reused": report.reused, "captions": report.captions}, indent=1))
    logger.info("BoLID prepare: %d identities, %d views, %d images skipped, %d identities dropped -> %s",
                len(report.identities), sum(report.identities.values()), len(report.skipped),
                len(report.dropped_identities), cache)
    logger.info("BoLID prepare: captions of the usable views: %d from caption files, %d from the captioning model, "
                "%d without a caption", report.captions["file"], report.captions["model"], report.captions["none"])
    return report


def _reuse_dropped(path: Path, fingerprint: str, report: PrepareReport) -> bool:
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if record.get("fingerprint") != fingerprint:
        return False
    for item in record.get("skipped", []):
        report.skip(item[0], item[1])
    report.dropped_identities.append((record["folder"], record["reason"]))
    logger.warning("BoLID prepare: dropped identity %s: %s (unchanged since the last prepare)", record["folder"],
                   record["reason"])
    return True


def _reuse_cache(path: Path, fingerprint: str, report: PrepareReport) -> int | None:
    if not path.is_file():
        return None
    try:
        meta = read_safetensors_metadata(path, DatasetCacheError)
    except DatasetCacheError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    # skips recorded when the cache was written are reported again, so the report is complete
    for item in json.loads(meta.get("skipped", "[]")):
        report.skip(item[0], item[1])
    # caches written before caption sources were recorded took every caption from a file
    texts = json.loads(meta.get("captions", "[]"))
    for source in json.loads(meta.get("caption_sources", "null")) or ["file" if t else "none" for t in texts]:
        report.captions[source] = report.captions.get(source, 0) + 1
    return int(meta.get("num_views", "0"))


def _prepare_identity(config: DatasetConfig, pose_runner: Any, images: list[Path], min_res: int,
                      margin: float, report: PrepareReport) -> list[dict[str, Any]]:
    views: list[dict[str, Any]] = []
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        people_lists = detect_people(pose_runner, [img for _, img in pending])
        for (path, img), people in zip(pending, people_lists, strict=True):
            view = _select_view(path, img, people, config, margin, report)
            if view is not None:
                views.append(view)
        pending.clear()

    for path in images:
        try:
            img = read_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            report.skip(path, f"unreadable ({type(exc).__name__}: {exc})")
            continue
        h, w = img.shape[:2]
        if min(h, w) < min_res:
            report.skip(path, f"too small ({w}x{h}, shortest side < {min_res} px)")
            continue
        pending.append((path, img))
        if len(pending) >= config.batch_size_pose:
            flush()
    if pending:
        flush()
    return views


def _select_view(path: Path, img: np.ndarray, people: list[PersonPose], config: DatasetConfig, margin: float,
                 report: PrepareReport) -> dict[str, Any] | None:
    chosen = choose_person(people, "largest", "skip", config.multi_person_ratio)
    if chosen.pose is None:
        if chosen.people > 1:
            report.skip(path, f"{chosen.reason}; the photos of an identity must show only them")
        else:
            report.skip(path, chosen.reason)
        return None
    pose = chosen.pose
    if not pose.body_confidence >= config.min_confidence:
        report.skip(path, f"body keypoints not visible enough (confidence {pose.body_confidence:.2f} "
                          f"< {config.min_confidence:.2f})")
        return None
    crop, kp = person_view(img, pose, config.crop_size, margin)
    return {"name": path.name, "crop": crop, "keypoints": kp, "image_keypoints": pose.keypoints,
            "box": pose.box, "weight": pose.body_confidence, "size": (img.shape[1], img.shape[0])}


def _write_identity_cache(path: Path, identity: str, views: list[dict[str, Any]], captions: list[Path],
                          fingerprint: str, skipped: list[tuple[str, str]], crop_margin: float,
                          model_captions: Mapping[str, str], report: PrepareReport) -> None:
    caption_by_name = {c.with_suffix("").name: c for c in captions}
    texts, sources = [], []
    for v in views:
        c = caption_by_name.get(Path(v["name"]).stem)
        if v["name"] in model_captions:
            texts.append(model_captions[v["name"]].strip())
            sources.append("model" if texts[-1] else "none")
        else:
            texts.append(c.read_text(encoding="utf-8").strip() if c is not None and c.is_file() else "")
            sources.append("file" if texts[-1] else "none")
        report.captions[sources[-1]] += 1
    kp = torch.from_numpy(np.stack([v["keypoints"] for v in views]))
    props, conf = body_proportions(kp.double())
    id_props, id_conf = aggregate_proportions(props, conf, dim=0)
    tensors = {
        "crops": torch.from_numpy(np.stack([v["crop"] for v in views])),
        "keypoints": kp,
        "image_keypoints": torch.from_numpy(np.stack([v["image_keypoints"] for v in views])),
        "boxes": torch.from_numpy(np.stack([v["box"] for v in views])),
        "weights": torch.tensor([v["weight"] for v in views], dtype=torch.float32),
        "proportions": id_props.float(),
        "proportion_confidence": id_conf.float(),
    }
    metadata = {"bolid_kind": CACHE_KIND, "bolid_format_version": str(CACHE_FORMAT_VERSION), "identity": identity,
                "files": json.dumps([v["name"] for v in views]), "captions": json.dumps(texts),
                "caption_sources": json.dumps(sources),
                "sizes": json.dumps([list(v["size"]) for v in views]), "fingerprint": fingerprint,
                "num_views": str(len(views)), "skipped": json.dumps(skipped), "crop_margin": repr(float(crop_margin))}
    atomic_save_safetensors(tensors, path, metadata)


# ----------------------------------------------------------------------------------------------- training data


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


def read_identity_crops(cache: IdentityCache) -> torch.Tensor:
    """All crops of one identity as float [V, 3, S, S] in 0..1."""
    with safe_open(str(cache.path), framework="pt") as f:
        crops = f.get_tensor("crops")
    return crops.permute(0, 3, 1, 2).float() / 255.0


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
                 seed: int = 0, flip: bool = True) -> None:
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

    def __len__(self) -> int:
        return self.num_samples

    def _crops(self, cache: IdentityCache, rows: list[int]) -> torch.Tensor:
        with safe_open(str(cache.path), framework="pt") as f:
            sl = f.get_slice("crops")
            crops = torch.stack([sl[r : r + 1][0] for r in rows])
        return views_to_tensor(crops)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        cache = self.identities[int(rng.integers(len(self.identities)))]
        n = cache.num_views
        k = int(rng.integers(1, min(self.max_context_views, n - 1) + 1))
        rows = [int(r) for r in rng.permutation(n)[: k + 1]]
        flips = rng.random(k + 1) < 0.5 if self.flip else np.zeros(k + 1, dtype=bool)
        crops = self._crops(cache, rows)
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


def config_summary(config: DatasetConfig) -> dict[str, Any]:
    """Flat, JSON-friendly view of the dataset config (for logs and exported metadata)."""
    d = asdict(config)
    d["subsets"] = [s["root"] for s in d["subsets"]]
    return d
