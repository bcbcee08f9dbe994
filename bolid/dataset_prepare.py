"""The one-time prepare step of a dataset: the pose model runs once per image, one safetensors cache per identity.

Crops as uint8, keypoints and confidences; file names and captions in the metadata, so training never touches the
photos or the pose model. Unchanged identities are reused (a fingerprint of the settings and files). Every skipped
image is logged with its reason and listed in ``prepare_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .body_views import person_view
from .dataset import (
    CACHE_FORMAT_VERSION,
    CACHE_KIND,
    INDEX_FILE,
    REPORT_FILE,
    DatasetCacheError,
    DatasetConfig,
    list_identities,
    read_rgb,
)
from .keypoints import PersonPose, choose_person, detect_people
from .proportions import aggregate_proportions, body_proportions
from .safetensors_io import atomic_save_safetensors, atomic_write_text, read_safetensors_metadata

logger = logging.getLogger("bolid")



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
