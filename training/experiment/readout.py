"""What the world's pose model reads from an image: the experiment's single measuring instrument.

One pass gives the keypoints (proportions, body error), the appearance (skin and hair class probabilities, build
z-scores), the caption attributes (the world's CLIP-T stand-in), whether the render failed
(:mod:`.render_check`) and pooled features (FID in the pose model's feature space). The same wrapper is the pose
runner of stage 1's prepare step and the differentiable pose network of stage 2's L_id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from bolid.keypoints import PersonPose
from bolid.safetensors_io import update_hash_with_weights

from .render_check import render_failed
from .world_models import ATTRIBUTES, WorldPoseNet, to_model_range


@dataclass
class Readout:
    """Per-image readings (numpy, first axis = image)."""

    keypoints: np.ndarray  # [N, 17, 3] pixels + confidence
    skin: np.ndarray  # [N, n_skin] probabilities
    hair: np.ndarray  # [N, n_hair]
    build: np.ndarray  # [N, 2] limb width and waist width z-scores
    attributes: list[dict[str, str]]
    failed: np.ndarray  # [N] bool
    features: np.ndarray  # [N, F]

    def appearance_vector(self) -> np.ndarray:
        """[N, n_skin + n_hair + 2]: what identifies a person by looks (class probabilities and build)."""
        return np.concatenate([self.skin, self.hair, 0.5 * self.build], 1)


def person_from_keypoints(kp: np.ndarray, pad: float = 2.0) -> PersonPose:
    lo, hi = kp[:, :2].min(0) - pad, kp[:, :2].max(0) + pad
    return PersonPose(box=np.concatenate([lo, hi]), score=float(kp[:, 2].mean()), keypoints=kp)


class WorldPose:
    """The world's pose model as everything the experiment wants from it."""

    def __init__(self, net: WorldPoseNet) -> None:
        self.net = net.eval().requires_grad_(False)
        # stage 1's prepare step reuses cached keypoints whose settings match, the pose runner's name among them;
        # naming the weights keeps a retrained pose model from reusing another model's keypoints
        digest = hashlib.sha256()
        update_hash_with_weights(digest, self.net)
        self.fingerprint = f"world-pose-net-{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def read(self, images: np.ndarray | list[np.ndarray], batch: int = 256) -> Readout:
        arr = np.stack(list(images))
        parts: dict[str, list] = {k: [] for k in ("keypoints", "skin", "hair", "build", "features", "failed")}
        attributes: list[dict[str, str]] = []
        for i in range(0, len(arr), batch):
            out = self.net(to_model_range(arr[i : i + batch]))
            parts["keypoints"].append(out["keypoints"].numpy())
            parts["skin"].append(out["skin"].softmax(-1).numpy())
            parts["hair"].append(out["hair"].softmax(-1).numpy())
            parts["build"].append(out["build"].numpy())
            parts["features"].append(out["features"].numpy())
            parts["failed"].append(render_failed(out))
            idx = {k: out[k].argmax(-1).tolist() for k in ATTRIBUTES}
            attributes += [{k: ATTRIBUTES[k][idx[k][j]] for k in ATTRIBUTES} for j in range(len(idx["pose"]))]
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        return Readout(keypoints=cat["keypoints"].astype(np.float32), skin=cat["skin"], hair=cat["hair"],
                       build=cat["build"], attributes=attributes, failed=cat["failed"].astype(bool),
                       features=cat["features"])

    def keypoints(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        return self.read(images).keypoints

    def detect(self, images: list[np.ndarray]) -> list[list[PersonPose]]:
        """Pose runner for stage 1's prepare step."""
        kp = self.keypoints(images)
        return [[person_from_keypoints(k)] if k[5:, 2].mean() > 0.3 else [] for k in kp]

    def pose_net(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-2 L_id: images [B, 3, H, W] in 0..1 -> (xy [B, 17, 2] pixels, confidence [B, 17])."""
        kp = self.net(images * 2.0 - 1.0)["keypoints"]
        return kp[..., :2], kp[..., 2]


class FeatureModule(torch.nn.Module):
    """uint8 [N, 3, H, W] -> pooled pose-model features (the FID extractor of bolid.metrics)."""

    def __init__(self, pose: WorldPose) -> None:
        super().__init__()
        self.pose = pose

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pose.net(x.float() / 127.5 - 1.0)["features"]
