"""Evaluate generated images: body consistency, face similarity, CLIP-T, FID, IS -> tables (md/csv/json) + plots.

    python -m training.evaluate --manifest eval.json --pose-model models/bolid_pose/yolo11n-pose.onnx \\
        [--face-model-dir models/insightface/models/antelopev2] [--clip-model ViT-B-32 --clip-weights clip.bin] \\
        [--inception-weights pt_inception-2015-12-05-6726825d.pth] --out eval_out

The manifest (JSON) lists the generated images per condition and the reference photos per identity::

    {"references": {"alice": ["refs/alice/1.jpg", ...], ...},
     "real": ["real/0001.jpg", ...],                      # optional: the real set for FID
     "conditions": {"text only": [{"image": "gen/t/0.png", "identity": "alice", "caption": "..."}, ...],
                    "BoLID multi-view": [...]}}

Relative paths are relative to the manifest. Each metric runs only when its model is given; a missing model file
is a clear error naming the file (nothing is downloaded). The library side is :mod:`bolid.metrics`; the experiment
(``python -m training.experiment``) calls :func:`evaluate_condition` and :func:`write_report` in-process.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bolid.errors import BoLIDError
from bolid.metrics import (
    body_consistency,
    face_similarity,
    fid_score,
    inception_score,
    load_inception,
    reference_proportions,
)

logger = logging.getLogger("bolid")

KeypointFn = Callable[[Sequence[np.ndarray]], np.ndarray]  # uint8 images -> [N, 17, 3] (zeros: nobody)


def _sem(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def identity_references(keypoints_by_identity: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """identity -> (reference proportions [6], confidence [6]) from its reference photos' keypoints."""
    return {k: reference_proportions(v) for k, v in keypoints_by_identity.items()}


def evaluate_condition(images: Sequence[np.ndarray], identities: Sequence[str], captions: Sequence[str],
                       references: dict[str, tuple[np.ndarray, np.ndarray]], keypoints_fn: KeypointFn,
                       face_fn: Callable[[np.ndarray], np.ndarray | None] | None = None,
                       reference_faces: dict[str, np.ndarray] | None = None,
                       clip_fn: Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray] | None = None,
                       fid_extractor: Any = None, real_images: np.ndarray | None = None,
                       is_extractor: Any = None, keypoints: np.ndarray | None = None) -> dict[str, Any]:
    """All available metrics for one condition's images (uint8 HxWx3 each); per-image values under ``per_image``.

    ``keypoints`` (precomputed [N, 17, 3]) skips running ``keypoints_fn``.
    """
    images = [np.asarray(im) for im in images]
    n = len(images)
    if not (n == len(identities) == len(captions)):
        raise ValueError(f"{n} images, {len(identities)} identities, {len(captions)} captions")
    kp = np.asarray(keypoints) if keypoints is not None else np.asarray(keypoints_fn(images))
    ref = np.stack([references[i][0] for i in identities])
    ref_c = np.stack([references[i][1] for i in identities])
    body = body_consistency(kp, ref, ref_c)
    row: dict[str, Any] = {"images": n, "body_error": body.mean, "body_error_sem": _sem(body.errors),
                           "body_detected": body.detected}
    per_image: dict[str, list] = {"body_error": body.errors.tolist()}
    if face_fn is not None and reference_faces is not None:
        sims_arr = np.array([face_similarity([face_fn(im)], reference_faces[i]).similarities[0]
                             for im, i in zip(images, identities, strict=True)])
        ok = np.isfinite(sims_arr)
        row.update(face_similarity=float(sims_arr[ok].mean()) if ok.any() else float("nan"),
                   face_similarity_sem=_sem(sims_arr), face_detected=float(ok.mean()))
        per_image["face_similarity"] = sims_arr.tolist()
    if clip_fn is not None:
        scores = np.asarray(clip_fn(images, captions), dtype=np.float64)
        row.update(clip_t=float(scores.mean()), clip_t_sem=_sem(scores))
        per_image["clip_t"] = scores.tolist()
    if fid_extractor is not None and real_images is not None:
        row["fid"] = fid_score(np.asarray(real_images), np.stack(images), feature_extractor=fid_extractor)
    if is_extractor is not None:
        row["is"], row["is_std"] = inception_score(np.stack(images), logits_extractor=is_extractor)
    row["per_image"] = per_image
    return row


# ----------------------------------------------------------------------------------------------- reports

COLUMN_TITLES: dict[str, str] = {
    "body_error": "body error ↓", "body_detected": "body found", "face_similarity": "face sim ↑",
    "clip_t": "CLIP-T ↑", "fid": "FID ↓", "is": "IS ↑",
}


def _fmt(value: Any, sem: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
        if sem is not None and isinstance(sem, float) and math.isfinite(sem):
            text += f" ± {sem:.4f}" if abs(sem) < 10 else f" ± {sem:.2f}"
        return text
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str], titles: dict[str, str] | None = None) -> str:
    """A markdown table: one row per condition; ``<metric>_sem`` is shown as ± when present."""
    titles = {**COLUMN_TITLES, **(titles or {})}
    head = ["condition", *(titles.get(c, c) for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [str(r["condition"])] + [_fmt(r.get(c), r.get(f"{c}_sem")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, columns: Sequence[str] | None = None,
                 titles: dict[str, str] | None = None, stem: str = "results", plot_metrics: Sequence[str] = (),
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """``<stem>.md``, ``<stem>.csv``, ``<stem>.json`` (with per-image values) and ``<stem>_<metric>.png`` plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if columns is None:
        seen = [k for r in rows for k in r if k not in ("condition", "per_image") and not k.endswith("_sem")]
        columns = list(dict.fromkeys(seen))
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    paths["md"].write_text(markdown_table(rows, columns, titles) + "\n", encoding="utf-8")
    flat_keys = list(dict.fromkeys(k for r in rows for k in r if k != "per_image"))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=flat_keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in flat_keys})
    paths["json"].write_text(json.dumps({"rows": rows, **(extra or {})}, indent=1, default=_json_default),
                             encoding="utf-8")
    for metric in plot_metrics:
        if any(isinstance(r.get(metric), float) and math.isfinite(r[metric]) for r in rows):
            paths[f"plot_{metric}"] = plot_metric(rows, metric, out / f"{stem}_{metric}.png",
                                                  {**COLUMN_TITLES, **(titles or {})}.get(metric, metric))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def plot_metric(rows: list[dict[str, Any]], metric: str, path: str | Path, title: str) -> Path:
    """A horizontal bar chart of one metric over the conditions, with ±SEM error bars when available."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["condition"]) for r in rows]
    values = [float(r.get(metric, float("nan"))) for r in rows]
    errs = [float(r.get(f"{metric}_sem", 0.0) or 0.0) for r in rows]
    errs = [e if math.isfinite(e) else 0.0 for e in errs]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, xerr=errs, color="#4a7ab5", capsize=3)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------- CLI


def _read_images(paths: Sequence[Path]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for p in paths:
        if not p.is_file():
            raise BoLIDError(f"image not found: {p}")
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return out


def _yolo_keypoints(path: str, provider: str) -> KeypointFn:
    from bolid.pose import PoseRunner

    runner = PoseRunner(path, provider)

    def fn(images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(images), 17, 3), dtype=np.float32)
        for i, people in enumerate(runner.detect(list(images))):
            if people:
                best = max(people, key=lambda p: (p.area, p.body_confidence))
                out[i] = best.keypoints
        return out

    return fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="BoLID evaluation: body consistency, face similarity, CLIP-T, FID, IS")
    p.add_argument("--manifest", required=True, help="JSON: references, conditions, optional real set")
    p.add_argument("--pose-model", required=True, help="YOLO pose .onnx (bolid.pose) for body consistency")
    p.add_argument("--provider", default="auto")
    p.add_argument("--face-model-dir", default=None, help="InsightFace pack folder (antelopev2, buffalo_l, ...)")
    p.add_argument("--clip-model", default=None, help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--clip-weights", default=None, help="local open_clip weights file")
    p.add_argument("--inception-weights", default=None, help="local InceptionV3 weights for FID/IS")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    try:
        manifest_path = Path(args.manifest).resolve()
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        base = manifest_path.parent
        keypoints_fn = _yolo_keypoints(args.pose_model, args.provider)
        refs_kp, ref_faces = {}, {}
        face_fn = None
        if args.face_model_dir:
            from bolid.face import FaceAnalyzer, average_embeddings

            analyzer = FaceAnalyzer(args.face_model_dir, args.provider)
            face_fn = analyzer.embed_one
        for ident, paths in manifest["references"].items():
            imgs = _read_images([base / q for q in paths])
            refs_kp[ident] = keypoints_fn(imgs)
            if face_fn is not None:
                embs = [e for e in (face_fn(im) for im in imgs) if e is not None]
                if not embs:
                    raise BoLIDError(f"no face found in any reference photo of {ident}")
                ref_faces[ident] = average_embeddings(embs)
        references = identity_references(refs_kp)
        clip_fn = None
        if args.clip_model or args.clip_weights:
            if not (args.clip_model and args.clip_weights):
                raise BoLIDError("CLIP-T needs both --clip-model and --clip-weights")
            from bolid.metrics import OpenCLIPScorer

            clip_fn = OpenCLIPScorer(args.clip_model, args.clip_weights)
        fid_ext = is_ext = real = None
        if args.inception_weights:
            fid_ext = load_inception(args.inception_weights, "2048")
            is_ext = load_inception(args.inception_weights, "logits_unbiased")
            if manifest.get("real"):
                real = np.stack(_read_images([base / q for q in manifest["real"]]))
        rows = []
        for name, entries in manifest["conditions"].items():
            imgs = _read_images([base / e["image"] for e in entries])
            row = evaluate_condition(imgs, [e["identity"] for e in entries], [e.get("caption", "") for e in entries],
                                     references, keypoints_fn, face_fn, ref_faces or None, clip_fn, fid_ext, real,
                                     is_ext)
            rows.append({"condition": name, **row})
            logger.info("%s: %s", name, {k: v for k, v in row.items() if k != "per_image"})
        columns = [c for c in ("body_error", "body_detected", "face_similarity", "clip_t", "fid", "is")
                   if any(c in r for r in rows)]
        paths = write_report(rows, args.out, columns, plot_metrics=columns)
    except BoLIDError as exc:
        logger.error("%s", exc)
        return 2
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
