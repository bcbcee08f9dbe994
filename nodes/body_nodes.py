"""Body identity nodes: load the Body-ID encoder, encode a body from photos, save/load/sample/blend Body IDs.

All nodes are stateless; identities live in the one "bolid_body_ids" folder that both Save and Load use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..bolid.body_encode import BodyEncodeError, encode_body
from ..bolid.body_encoder import BodyEncoder
from ..bolid.body_encoder_io import load_body_encoder
from ..bolid.body_id_io import BodyIDFileError, blend_body_ids, body_id_path, load_body_id, sample_body_id, save_body_id
from ..bolid.body_views import crop_person
from ..bolid.identity import BodyID
from ..bolid.keypoints import PersonPose, choose_person, detect_people
from ..bolid.skeleton import draw_poses
from .comfy_batch import batch_progress, check_interrupted, image_list_to_uint8, image_names, one
from .comfy_env import folder_paths_module, model_file_list, model_file_path, register_model_folders

logger = logging.getLogger("bolid")
CATEGORY = "BoLID/body"
BODY_IDS_FOLDER = "bolid_body_ids"
PREVIEW_SIZE = 192
POSE_CHUNK = 8
SEVERAL_PEOPLE = ("use the largest", "skip the image")
SEVERAL_PEOPLE_POLICY = {"use the largest": "use_main", "skip the image": "skip"}  # bolid.keypoints.choose_person


@dataclass(frozen=True)
class LoadedBodyEncoder:
    """The BOLID_BODY_ENCODER socket value: the encoder with its content hash, computed once when loaded.

    Encode/Sample stamp identities with ``hash`` instead of re-hashing all weights on every run.
    """

    model: BodyEncoder
    hash: str
    name: str

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim


def _loaded(body_encoder: Any) -> LoadedBodyEncoder:
    if not isinstance(body_encoder, LoadedBodyEncoder):
        raise TypeError(f"body_encoder must come from Load Body-ID Encoder (BoLID), got {type(body_encoder).__name__}")
    return body_encoder


def _detect(pose_model: Any, images: list[np.ndarray]) -> list[list[PersonPose]]:
    """Pose detection in chunks, with ComfyUI's progress bar and interruption."""
    step = batch_progress(len(images))
    out: list[list[PersonPose]] = []
    for start in range(0, len(images), POSE_CHUNK):
        check_interrupted()
        chunk = images[start:start + POSE_CHUNK]
        out.extend(detect_people(pose_model, chunk))
        step(start + len(chunk))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def preview_views(images: list[np.ndarray], poses: list[PersonPose], names: list[str], weights: list[float],
                  margin: float) -> torch.Tensor:
    """The views used, each as its person crop with the skeleton, its name and a bar showing its weight."""
    total = sum(weights) or 1.0
    tiles = []
    for image, pose, name, w in zip(images, poses, names, weights, strict=True):
        crop, kp = crop_person(image, pose, PREVIEW_SIZE, margin)
        in_crop = kp.copy()
        in_crop[:, :2] *= PREVIEW_SIZE
        drawn = draw_poses(crop, [PersonPose(box=np.zeros(4), score=pose.score, keypoints=in_crop)], boxes=False,
                           thickness=2)
        tile = Image.fromarray(drawn)
        draw = ImageDraw.Draw(tile)
        bar_h = 22
        draw.rectangle([0, PREVIEW_SIZE - bar_h, PREVIEW_SIZE, PREVIEW_SIZE], fill=(0, 0, 0))
        draw.rectangle([0, PREVIEW_SIZE - 4, int(PREVIEW_SIZE * w), PREVIEW_SIZE], fill=(255, 200, 0))
        draw.text((4, PREVIEW_SIZE - bar_h + 2), f"{name}  w={w:.2f} ({100 * w / total:.0f}%)",
                  fill=(255, 255, 255), font=_font(12))
        tiles.append(np.asarray(tile, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(tiles))


class LoadBodyEncoder:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        return {"required": {"encoder_name": (model_file_list("bolid"), {
            "tooltip": "a Body-ID encoder (.safetensors) in models/bolid, exported by stage-1 training"})}}

    RETURN_TYPES = ("BOLID_BODY_ENCODER",)
    RETURN_NAMES = ("body_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Body-ID encoder (.safetensors from models/bolid, exported by stage-1 training)."

    def load(self, encoder_name: str) -> tuple[LoadedBodyEncoder]:
        model, info = load_body_encoder(model_file_path("bolid", encoder_name))
        loaded = LoadedBodyEncoder(model=model, hash=info.content_hash, name=encoder_name)
        logger.info("BoLID: loaded body encoder %s (c_body dim %d, hash %s)", encoder_name, loaded.latent_dim,
                    info.content_hash)
        return (loaded,)


def _is_pose(value: Any) -> bool:
    return value is None or (hasattr(value, "keypoints") and hasattr(value, "box"))


def given_poses(poses: Any) -> list[tuple[PersonPose | None, list[PersonPose], tuple[int, int] | None]]:
    """BOLID_POSES input (one value, or the list ComfyUI hands a list node) -> per image (main, people, size).

    A value from Detect Body Pose carries every detected person and the image sizes; a plain list of
    ``PersonPose | None`` is taken as the main person per image.
    """
    values = [poses] if hasattr(poses, "people") or all(_is_pose(p) for p in poses) else list(poses)
    out = []
    for value in values:
        people = getattr(value, "people", None)
        sizes = getattr(value, "sizes", None)
        for i, main in enumerate(value):
            found = list(people[i]) if people is not None else ([] if main is None else [main])
            out.append((main, found, tuple(sizes[i]) if sizes is not None else None))
    return out


class EncodeBodyFromImages:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "body_encoder": ("BOLID_BODY_ENCODER",),
            "pose_model": ("BOLID_POSE_MODEL",),
            "images": ("IMAGE",),
            "min_confidence": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "views whose mean body-joint confidence is lower are skipped"}),
            "several_people": (list(SEVERAL_PEOPLE), {
                "default": SEVERAL_PEOPLE[0],
                "tooltip": "a photo with another person of at least 0.3x the main person's size: use the main "
                           "(largest) person, or leave the photo out; smaller background people are ignored"}),
        }, "optional": {
            "poses": ("BOLID_POSES", {"tooltip": "poses from Detect Body Pose (BoLID) on the same images: used "
                                                 "instead of detecting again"}),
        }}

    RETURN_TYPES = ("BOLID_BODY_ID", "IMAGE")
    RETURN_NAMES = ("body_id", "views_preview")
    INPUT_IS_LIST = True  # photos of any size, each used whole (a list, not an Image Batch)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes one person's body identity from one or more photos; views are weighted by pose "
                   "confidence. Photos of different sizes: connect Load Images From Folder (BoLID), a list; "
                   "each photo is used whole. With poses from Detect Body Pose connected, nothing is detected "
                   "twice. The preview shows the views used and their weights.")

    def encode(self, body_encoder: LoadedBodyEncoder, pose_model: Any, images: torch.Tensor | list[torch.Tensor],
               min_confidence: float, several_people: str = SEVERAL_PEOPLE[0],
               poses: Any = None) -> tuple[BodyID, torch.Tensor]:
        body_encoder, pose_model = _loaded(one(body_encoder)), one(pose_model)
        min_confidence, several_people = float(one(min_confidence)), one(several_people)
        if several_people not in SEVERAL_PEOPLE_POLICY:
            raise ValueError(f"several_people must be one of {SEVERAL_PEOPLE}, got {several_people!r}")
        arrays = image_list_to_uint8(images)
        names = image_names(len(arrays))
        if poses is None:
            found = [(None, people, None) for people in _detect(pose_model, arrays)]
        else:
            found = given_poses(poses)
            if len(found) != len(arrays):
                raise BodyEncodeError(f"Encode Body From Images: the poses cover {len(found)} image(s) but "
                                      f"{len(arrays)} image(s) are connected; connect the same images to Detect "
                                      "Body Pose and to Encode Body From Images")
            for name, array, (_, _, size) in zip(names, arrays, found, strict=True):
                if size is not None and size != (array.shape[1], array.shape[0]):
                    raise BodyEncodeError(f"Encode Body From Images: the poses of {name} were detected on a "
                                          f"{size[0]}x{size[1]} image, but {name} is {array.shape[1]}x"
                                          f"{array.shape[0]}; connect the same images to both nodes")
        chosen: list[PersonPose | None] = []
        reasons: list[str | None] = []  # why a pose is None, for the error when no view is left
        for name, (main, people, _) in zip(names, found, strict=True):
            choice = choose_person(people, "largest", SEVERAL_PEOPLE_POLICY[several_people], main=main)
            if choice.pose is None and choice.people > 1:
                logger.warning("BoLID encode body: skipped %s: %s", name, choice.reason)
                reasons.append(f"{choice.reason} and several_people is '{several_people}'")
            else:
                reasons.append(None)
                if choice.people > 1:
                    logger.info("BoLID encode body: %s shows %d people, using the main person", name, choice.people)
            chosen.append(choice.pose)
        try:
            result = encode_body(body_encoder.model, arrays, chosen, names, min_confidence,
                                 model_hash=body_encoder.hash, skip_reasons=reasons)
        except BodyEncodeError as exc:
            raise BodyEncodeError(f"Encode Body From Images: {exc}") from exc
        index = {n: i for i, n in enumerate(names)}
        used = [index[n] for n in result.used]
        preview = preview_views([arrays[i] for i in used], [chosen[i] for i in used], result.used, result.weights,
                                body_encoder.model.config.crop_margin)
        logger.info("BoLID encode body: %d view(s) used (%s), %d skipped", len(used),
                    ", ".join(f"{n} w={w:.2f}" for n, w in zip(result.used, result.weights, strict=True)),
                    len(result.skipped))
        return (result.body_id, preview)


def body_ids_folder() -> Path:
    """The folder Save Body ID writes to: the first "bolid_body_ids" path (Load lists all of them)."""
    register_model_folders()
    return Path(folder_paths_module().get_folder_paths(BODY_IDS_FOLDER)[0])


class SaveBodyID:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "body_id": ("BOLID_BODY_ID",),
            "name": ("STRING", {"default": "my_body", "tooltip": "file name in models/bolid_body_ids (letters, "
                                                                 "digits, space, _ - .; no folders)"}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace an existing Body ID of that name"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves a body identity to models/bolid_body_ids so it can be reused with text only."

    def save(self, body_id: BodyID, name: str, overwrite: bool) -> tuple[str]:
        path = body_id_path(body_ids_folder(), name)
        save_body_id(body_id, path, overwrite=overwrite)
        logger.info("BoLID: saved body ID %s (%d dims, %d views)", path, body_id.dim, len(body_id.views))
        return (path.name,)


class LoadBodyID:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"body_id_name": (model_file_list(BODY_IDS_FOLDER), {
            "tooltip": "a Body ID saved by Save Body ID (models/bolid_body_ids)"})}}

    RETURN_TYPES = ("BOLID_BODY_ID",)
    RETURN_NAMES = ("body_id",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a body identity saved by Save Body ID (models/bolid_body_ids)."

    @classmethod
    def IS_CHANGED(cls, body_id_name: str):  # noqa: N802 - a re-saved file must be re-read
        try:
            st = os.stat(model_file_path(BODY_IDS_FOLDER, body_id_name))
        except (OSError, FileNotFoundError):
            return ""
        return f"{st.st_mtime_ns}-{st.st_size}"

    def load(self, body_id_name: str) -> tuple[BodyID]:
        path = Path(model_file_path(BODY_IDS_FOLDER, body_id_name)).resolve()
        roots = [Path(p).resolve() for p in folder_paths_module().get_folder_paths(BODY_IDS_FOLDER)]
        if not any(path.is_relative_to(r) for r in roots):
            raise BodyIDFileError(f"body ID {body_id_name!r} is outside the bolid_body_ids folders")
        return (load_body_id(path),)


class SampleBodyID:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "body_encoder": ("BOLID_BODY_ENCODER",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF,
                             "tooltip": "the same seed draws the same body on any machine"}),
            "temperature": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                                      "tooltip": "scale of the draw; < 1 gives more typical bodies"}),
        }}

    RETURN_TYPES = ("BOLID_BODY_ID",)
    RETURN_NAMES = ("body_id",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Draws a new body identity, reproducibly from the seed: from the distribution of the training "
                   "identities stored with the encoder (what the adapter was trained on), or from N(0, I) for "
                   "encoders exported without it.")

    def sample(self, body_encoder: LoadedBodyEncoder, seed: int, temperature: float) -> tuple[BodyID]:
        body_encoder = _loaded(body_encoder)
        return (sample_body_id(body_encoder.latent_dim, seed, body_encoder.hash, temperature,
                               body_encoder.model.body_prior),)


class BlendBodyIDs:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "body_id_a": ("BOLID_BODY_ID",),
            "body_id_b": ("BOLID_BODY_ID",),
            "t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "0 = a, 1 = b"}),
            "method": (["linear", "slerp"], {"default": "linear", "tooltip": "slerp keeps the typical length of "
                                                                               "prior samples; linear mixes "
                                                                               "directly"}),
        }}

    RETURN_TYPES = ("BOLID_BODY_ID",)
    RETURN_NAMES = ("body_id",)
    FUNCTION = "blend"
    CATEGORY = CATEGORY
    DESCRIPTION = "Interpolates two body identities of the same encoder (slerp keeps prior-like norms)."

    def blend(self, body_id_a: BodyID, body_id_b: BodyID, t: float, method: str) -> tuple[BodyID]:
        return (blend_body_ids(body_id_a, body_id_b, t, method),)


NODE_CLASS_MAPPINGS = {
    "BoLIDLoadBodyEncoder": LoadBodyEncoder,
    "BoLIDEncodeBodyFromImages": EncodeBodyFromImages,
    "BoLIDSaveBodyID": SaveBodyID,
    "BoLIDLoadBodyID": LoadBodyID,
    "BoLIDSampleBodyID": SampleBodyID,
    "BoLIDBlendBodyIDs": BlendBodyIDs,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BoLIDLoadBodyEncoder": "Load Body-ID Encoder (BoLID)",
    "BoLIDEncodeBodyFromImages": "Encode Body From Images (BoLID)",
    "BoLIDSaveBodyID": "Save Body ID (BoLID)",
    "BoLIDLoadBodyID": "Load Body ID (BoLID)",
    "BoLIDSampleBodyID": "Sample Body ID (BoLID)",
    "BoLIDBlendBodyIDs": "Blend Body IDs (BoLID)",
}
