"""Stage-2 cache: per identity the VAE latents (aspect-ratio buckets), SDXL size conditioning, keypoints in the
training frame, the colours at body landmarks (:mod:`bolid.appearance`, for L_id's appearance term), face
embeddings and the Body-ID encoder's per-view posteriors; plus the caption embeddings.

Built once from the stage-1 dataset cache (same ``[dataset]`` table: crops, keypoints, captions) and the original
photos; reused while nothing it depends on changed (fingerprint per identity). Training then never runs the VAE
encoder, the text encoders, the face model or the Body-ID encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bolid.appearance import image_appearance
from bolid.body_encoder import BodyEncoder
from bolid.body_encoder_io import encoder_hash
from bolid.body_views import views_to_tensor
from bolid.dataset import DatasetCacheError, DatasetConfig, list_identities, read_rgb
from bolid.identity import no_identity
from bolid.identity_cache import load_identity_caches, read_cache_index
from bolid.safetensors_io import (
    atomic_save_safetensors,
    atomic_write_text,
    load_safetensors,
    read_safetensors_metadata,
)
from training.stage2_sampling import Stage2Identity

logger = logging.getLogger("bolid")

CACHE_KIND = "bolid_stage2_cache"
TEXT_KIND = "bolid_stage2_text"
CACHE_VERSION = 2  # 2: per-view appearance (L_id's appearance term)
INDEX_FILE = "stage2_index.json"
TEXT_FILE = "text_embeddings.safetensors"


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio buckets of about ``resolution`` squared pixels, sides multiples of ``step``."""

    resolution: int = 512
    step: int = 64
    min_aspect: float = 0.5
    max_aspect: float = 2.0

    def buckets(self) -> list[tuple[int, int]]:
        """(height, width) pairs."""
        area = self.resolution * self.resolution
        out = set()
        w = self.step
        while w <= self.resolution * 4:
            h = int(area / w) // self.step * self.step
            if h >= self.step and self.min_aspect <= w / h <= self.max_aspect:
                out.add((h, w))
            w += self.step
        out.add((self.resolution // self.step * self.step,) * 2)
        return sorted(out)

    def nearest(self, height: int, width: int) -> tuple[int, int]:
        ar = math.log(width / height)
        return min(self.buckets(), key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ar), -hw[0] * hw[1]))


def resize_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Scale (keeping the aspect) to cover the bucket, centre-crop. Returns (image, scale, (crop_top, crop_left))."""
    h, w = image.shape[:2]
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
    top, left = (nh - bh) // 2, (nw - bw) // 2
    return resized[top:top + bh, left:left + bw], scale, (top, left)


@torch.no_grad()
def prepare_stage2_cache(dataset: DatasetConfig, cache_dir: Path, buckets: BucketConfig, vae: Any,
                         encode_text: Callable, body_encoder: BodyEncoder, face_embed: Callable | None,
                         fingerprint_extra: dict[str, str], device: torch.device | str = "cpu",
                         vae_batch: int = 4) -> dict[str, Any]:
    """Build or reuse the stage-2 cache in ``cache_dir``; returns a small report."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stage1 = load_identity_caches(dataset.cache_dir)
    folders = {key: Path(subset.root) / name for key, name, subset, _ in list_identities(dataset)}
    enc_hash = encoder_hash(body_encoder)
    settings = {"buckets": [buckets.resolution, buckets.step, buckets.min_aspect, buckets.max_aspect],
                "encoder": enc_hash, "version": CACHE_VERSION, **fingerprint_extra}
    index, reused, built = [], 0, 0
    captions: set[str] = {""}
    for ident in stage1:
        key = ident.path.stem
        meta1 = read_safetensors_metadata(ident.path, DatasetCacheError)
        _check_crop_margin(ident.path, meta1, body_encoder)
        fingerprint = hashlib.sha256(json.dumps({**settings, "stage1": meta1.get("fingerprint", "")},
                                                sort_keys=True).encode()).hexdigest()
        out_path = cache_dir / f"{key}.safetensors"
        captions.update(ident.captions)
        if out_path.is_file():
            try:
                if read_safetensors_metadata(out_path, DatasetCacheError).get("fingerprint") == fingerprint:
                    index.append({"key": key, "file": out_path.name, "views": ident.num_views})
                    reused += 1
                    continue
            except DatasetCacheError:
                pass
        if key not in folders:
            raise DatasetCacheError(f"stage-1 cache {ident.path.name} belongs to no identity folder of the "
                                    "[dataset] table; run the stage-1 prepare step with this config")
        tensors1, _ = load_safetensors(ident.path, DatasetCacheError)
        tensors = _build_identity(folders[key], ident.files, tensors1, buckets, vae, body_encoder, face_embed,
                                  device, vae_batch)
        meta = {"bolid_kind": CACHE_KIND, "bolid_format_version": str(CACHE_VERSION), "identity": ident.identity,
                "files": json.dumps(ident.files), "captions": json.dumps(ident.captions),
                "fingerprint": fingerprint, "num_views": str(ident.num_views)}
        atomic_save_safetensors(tensors, out_path, meta)
        index.append({"key": key, "file": out_path.name, "views": ident.num_views})
        built += 1
    _cache_text(cache_dir / TEXT_FILE, sorted(captions), encode_text, fingerprint_extra.get("base_model", ""))
    atomic_write_text(cache_dir / INDEX_FILE, json.dumps({"identities": index}, indent=1))
    logger.info("BoLID stage 2 cache: %d identities (%d built, %d reused), %d captions -> %s", len(index), built,
                reused, len(captions), cache_dir)
    return {"identities": len(index), "built": built, "reused": reused, "captions": len(captions)}


def _check_crop_margin(path: Path, meta: dict[str, str], body_encoder: BodyEncoder) -> None:
    """The stage-1 crops must be cut with the Body-ID encoder's crop_margin (caches written before the margin was
    recorded are not checked)."""
    if "crop_margin" not in meta:
        return
    cached, expected = float(meta["crop_margin"]), float(body_encoder.config.crop_margin)
    if not math.isclose(cached, expected, rel_tol=0, abs_tol=1e-9):
        raise DatasetCacheError(f"stage-1 cache {path} was cropped with crop_margin {cached}, but the Body-ID encoder "
                                f"uses {expected}: run the stage-1 prepare step with the encoder's [model] crop_margin "
                                "(or use the encoder trained on this cache)")


def _build_identity(folder: Path, files: list[str], tensors1: dict[str, torch.Tensor], buckets: BucketConfig,
                    vae: Any, body_encoder: BodyEncoder, face_embed: Callable | None, device: Any,
                    vae_batch: int) -> dict[str, torch.Tensor]:
    crops = views_to_tensor(tensors1["crops"]).to(device)
    mu, logvar = body_encoder.encode_views(crops, tensors1["keypoints"].float().to(device))
    out: dict[str, torch.Tensor] = {"body_mu": mu.float().cpu(), "body_logvar": logvar.float().cpu(),
                                    "body_weights": tensors1["weights"].float()}
    kps, tids, faces, valid, apps, app_confs = [], [], [], [], [], []
    ref = next(vae.parameters())
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for k, name in enumerate(files):
        photo = folder / name
        if not photo.is_file():
            raise DatasetCacheError(f"photo {photo} (listed in the stage-1 cache) is missing; run the prepare step "
                                    "again")
        image = read_rgb(photo)
        h, w = image.shape[:2]
        bucket = buckets.nearest(h, w)
        crop, scale, (top, left) = resize_to_bucket(image, bucket)
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div(127.5).sub(1.0)[None].to(ref.device, ref.dtype)
        latent = (vae.encode(x).latent_dist.mean - shift) * scaling
        out[f"latent.{k}"] = latent[0].float().cpu()
        kp = tensors1["image_keypoints"][k].float().clone()
        kp[:, 0] = kp[:, 0] * scale - left
        kp[:, 1] = kp[:, 1] * scale - top
        kps.append(kp)
        view = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div(255.0)[None]
        appearance, appearance_conf = image_appearance(view, kp[None])
        apps.append(appearance[0])
        app_confs.append(appearance_conf[0])
        # SDXL micro-conditioning: original size, crop top-left, target size (in the resized image's pixels)
        tids.append(torch.tensor([h, w, top, left, bucket[0], bucket[1]], dtype=torch.float32))
        emb = face_embed(image) if face_embed is not None else None
        faces.append(no_identity(512) if emb is None else torch.as_tensor(np.asarray(emb, np.float32)))
        valid.append(emb is not None)
    out.update({"keypoints": torch.stack(kps), "time_ids": torch.stack(tids), "face": torch.stack(faces),
                "face_valid": torch.tensor(valid, dtype=torch.uint8), "appearance": torch.stack(apps),
                "appearance_confidence": torch.stack(app_confs)})
    return out


def _cache_text(path: Path, captions: list[str], encode_text: Callable, source: str, chunk: int = 16) -> None:
    if path.is_file():
        meta = read_safetensors_metadata(path, DatasetCacheError)
        if meta.get("source") == source and json.loads(meta.get("captions", "[]")) == captions:
            return
    tensors: dict[str, torch.Tensor] = {}
    for start in range(0, len(captions), chunk):
        embeds, pooled = encode_text(captions[start:start + chunk])
        for k in range(embeds.shape[0]):
            tensors[f"embeds.{start + k}"] = embeds[k].float().cpu().contiguous()
            if pooled is not None:
                tensors[f"pooled.{start + k}"] = pooled[k].float().cpu().contiguous()
    atomic_save_safetensors(tensors, path, {"bolid_kind": TEXT_KIND, "source": source,
                                            "captions": json.dumps(captions)})


def load_stage2_cache(cache_dir: str | Path, sdxl: bool
                      ) -> tuple[list[Stage2Identity], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """The cached identities and caption embeddings written by :func:`prepare_stage2_cache`."""
    cache_dir = Path(cache_dir)
    entries = read_cache_index(cache_dir / INDEX_FILE, "python training/train.py --config <stage-2 config> "
                                                      "--prepare-only")
    identities = []
    for entry in entries:
        tensors, meta = load_safetensors(cache_dir / entry["file"], DatasetCacheError)
        if meta.get("bolid_kind") != CACHE_KIND:
            raise DatasetCacheError(f"{cache_dir / entry['file']}: not a stage-2 cache file")
        if meta.get("bolid_format_version") != str(CACHE_VERSION):
            raise DatasetCacheError(f"{cache_dir / entry['file']}: stage-2 cache format "
                                    f"{meta.get('bolid_format_version')}, this BoLID reads {CACHE_VERSION}: run "
                                    "python training/train.py --config <stage-2 config> --prepare-only again")
        n = int(meta["num_views"])
        identities.append(Stage2Identity(
            name=meta.get("identity", entry["key"]), samples=[tensors[f"latent.{k}"] for k in range(n)],
            captions=json.loads(meta["captions"]), body_mu=tensors["body_mu"], body_logvar=tensors["body_logvar"],
            body_weights=tensors["body_weights"], keypoints=tensors["keypoints"], face=tensors["face"],
            face_valid=tensors["face_valid"].bool(), time_ids=tensors["time_ids"] if sdxl else None,
            appearance=tensors["appearance"], appearance_confidence=tensors["appearance_confidence"]))
    tensors, meta = load_safetensors(cache_dir / TEXT_FILE, DatasetCacheError)
    text = {}
    for k, caption in enumerate(json.loads(meta["captions"])):
        text[caption] = (tensors[f"embeds.{k}"], tensors.get(f"pooled.{k}"))
    return identities, text
