"""Perception nodes: load a YOLO pose ONNX model / an InsightFace pack, detect body pose, encode a face.

Stateless: loaders return runner objects (BOLID_POSE_MODEL, BOLID_FACE_ANALYSIS) and ComfyUI's own output cache
keeps them alive between runs. Batches show a progress bar and stop when the user cancels.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from ..bolid.errors import BoLIDError
from ..bolid.face import FaceAnalyzer, NoFaceError, check_face_model_dir
from ..bolid.face_id_io import FaceWeightsError, parse_photo_weights, weighted_face_average
from ..bolid.keypoints import PERSON_CHOICES, DetectedPoses, PersonPose, select_person
from ..bolid.onnx_providers import PROVIDER_CHOICES
from ..bolid.pose import PoseRunner
from ..bolid.skeleton import KEYPOINT_DRAW_CONF, draw_poses, fit_into, openpose_image
from .comfy_batch import batch_progress, check_interrupted, image_list_to_uint8, image_names, one
from .comfy_env import folder_paths_module, model_file_list, model_file_path

logger = logging.getLogger("bolid")
CATEGORY = "BoLID/perception"
DEFAULT_FACE_PACKS = ("antelopev2", "buffalo_l")
OPENPOSE_PEOPLE = ("main person", "everyone detected")
PROVIDER_TOOLTIP = ("onnxruntime execution provider: auto picks the best installed one; an explicit one that is "
                    "missing is an error (the log says which provider actually runs)")


# ----------------------------------------------------------------------------------------------------------------
# InsightFace model folders


def insightface_roots() -> list[str]:
    """Folders that hold ``models/<pack>/``: a registered "insightface" folder, else models/insightface."""
    fp = folder_paths_module()
    roots = []
    if "insightface" in getattr(fp, "folder_names_and_paths", {}):
        roots.extend(fp.get_folder_paths("insightface"))
    default = os.path.join(fp.models_dir, "insightface")
    if default not in roots:
        roots.append(default)
    return roots


def insightface_pack_names() -> list[str]:
    """Packs found (folders with .onnx files), plus the usual names so a missing pack gives a useful error."""
    names = []
    for root in insightface_roots():
        models = os.path.join(root, "models")
        if os.path.isdir(models):
            for entry in sorted(os.listdir(models)):
                folder = os.path.join(models, entry)
                if os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder)):
                    names.append(entry)
    return list(dict.fromkeys(names + list(DEFAULT_FACE_PACKS)))


def insightface_pack_dir(name: str) -> str:
    """The first root that holds the pack; else the default location (whose absence the loader reports)."""
    roots = insightface_roots()
    for root in roots:
        folder = os.path.join(root, "models", name)
        if os.path.isdir(folder):
            return folder
    return os.path.join(roots[-1], "models", name)


# ----------------------------------------------------------------------------------------------------------------
# nodes


class LoadPoseModel:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        return {"required": {
            "model_name": (model_file_list("bolid_pose"), {"tooltip": "YOLO pose ONNX file in models/bolid_pose "
                                                                       "(export with python -m bolid.pose export)"}),
            "provider": (list(PROVIDER_CHOICES), {"default": "auto", "tooltip": PROVIDER_TOOLTIP}),
        }}

    RETURN_TYPES = ("BOLID_POSE_MODEL",)
    RETURN_NAMES = ("pose_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a YOLO11-pose model exported to ONNX on onnxruntime; the log says which provider "
                   "actually runs.")

    def load(self, model_name: str, provider: str) -> tuple[PoseRunner]:
        runner = PoseRunner(model_file_path("bolid_pose", model_name), provider=provider)
        logger.info("BoLID: loaded pose model %s", runner.describe())
        return (runner,)


class LoadInsightFace:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "model_name": (insightface_pack_names(), {"tooltip": "folder in models/insightface/models/"}),
            "provider": (list(PROVIDER_CHOICES), {"default": "auto", "tooltip": PROVIDER_TOOLTIP}),
        }}

    RETURN_TYPES = ("BOLID_FACE_ANALYSIS",)
    RETURN_NAMES = ("face_analysis",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads an InsightFace pack (detector + ArcFace) from models/insightface/models/<name>/; "
                   "nothing is downloaded.")

    def load(self, model_name: str, provider: str) -> tuple[FaceAnalyzer]:
        folder = insightface_pack_dir(model_name)
        check_face_model_dir(folder)  # a clear error naming the folder, before any model is read
        analyzer = FaceAnalyzer(folder, provider=provider)
        logger.info("BoLID: loaded %s", analyzer.describe())
        return (analyzer,)


class DetectBodyPose:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "pose_model": ("BOLID_POSE_MODEL",),
            "image": ("IMAGE",),
            "confidence": ("FLOAT", {"default": 0.25, "min": 0.01, "max": 1.0, "step": 0.01,
                                     "tooltip": "minimum person detection score"}),
            "person": (list(PERSON_CHOICES), {"default": "largest",
                                              "tooltip": "which person is 'the' person when there are several"}),
        }}

    RETURN_TYPES = ("BOLID_POSES", "IMAGE")
    RETURN_NAMES = ("poses", "preview")
    INPUT_IS_LIST = True  # a list of photos of any sizes (Load Images From Folder) is detected as one set
    OUTPUT_IS_LIST = (False, True)  # one BOLID_POSES for the whole set; a preview per photo, at its size
    FUNCTION = "detect"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Finds the main person in each image: box and 17 COCO keypoints with confidences (None where "
                   "nobody is found), plus a preview with the skeleton drawn. Connect poses to Encode Body From "
                   "Images (detects nothing again) or to Poses To OpenPose Image (ControlNet).")

    def detect(self, pose_model: PoseRunner, image: torch.Tensor | list[torch.Tensor], confidence: float,
               person: str) -> tuple[DetectedPoses, list[torch.Tensor]]:
        pose_model, confidence, person = one(pose_model), float(one(confidence)), one(person)
        frames = image_list_to_uint8(image)
        step = batch_progress(len(frames))
        main: list[PersonPose | None] = []
        everyone: list[list[PersonPose]] = []
        previews = []
        for i, (frame, name) in enumerate(zip(frames, image_names(len(frames)), strict=True), start=1):
            check_interrupted()
            people = pose_model.detect(frame, conf=confidence)[0]
            chosen = select_person(people, person)
            if chosen is None:
                logger.warning("BoLID: no person found in %s (confidence >= %.2f)", name, confidence)
            main.append(chosen)
            everyone.append(people)
            previews.append(torch.from_numpy(draw_poses(frame, [chosen]).astype(np.float32) / 255.0)[None])
            step(i)
        poses = DetectedPoses(main, everyone, [(f.shape[1], f.shape[0]) for f in frames])
        return (poses, previews)


class EncodeFace:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "face_analysis": ("BOLID_FACE_ANALYSIS",),
            "image": ("IMAGE",),
            "no_face": (["error", "skip"], {"default": "error",
                                           "tooltip": "an image without a face: stop with an error naming it, "
                                                      "or leave it out of the average"}),
        }, "optional": {
            "photo_weights": ("STRING", {"default": "", "tooltip": "one weight per photo, comma-separated, in the "
                                                                   "photos' order (e.g. 1, 1, 0.5); empty = equal "
                                                                   "weights"}),
        }}

    RETURN_TYPES = ("BOLID_FACE_EMBEDS",)
    RETURN_NAMES = ("face_embeds",)
    INPUT_IS_LIST = True  # photos of any size (a list from Load Images From Folder), each used whole
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("ArcFace embedding of the largest face in each image, averaged over the photos (weighted by "
                   "photo_weights) and renormalised (detection retries 640, 512, 384, 256).")

    def encode(self, face_analysis: FaceAnalyzer, image: torch.Tensor | list[torch.Tensor], no_face: str,
               photo_weights: str = ""):
        face_analysis, no_face, photo_weights = one(face_analysis), one(no_face), one(photo_weights)
        if no_face not in ("error", "skip"):
            raise ValueError(f"no_face must be 'error' or 'skip', got {no_face!r}")
        frames = image_list_to_uint8(image)
        names = image_names(len(frames))
        weights = parse_photo_weights(photo_weights, len(frames))
        step = batch_progress(len(frames))
        found, used_names, used_weights, skipped = [], [], [], []
        for i, (frame, name, weight) in enumerate(zip(frames, names, weights, strict=True), start=1):
            try:
                one_face = face_analysis.embed([frame], no_face="error", names=[name])
            except NoFaceError:
                if no_face == "error":
                    raise
                logger.warning("BoLID: no face found in %s: skipped", name)
                skipped.append(name)
                step(i)
                continue
            found.append(one_face)
            used_names.append(name)
            used_weights.append(weight)
            step(i)
        if not found:
            raise NoFaceError(f"no face found in any of the {len(frames)} images ({', '.join(skipped)})")
        if sum(used_weights) <= 0:
            raise FaceWeightsError("every photo with a face has weight 0: give at least one of them a weight > 0")
        embeds = weighted_face_average([f.embedding for f in found], used_weights, used_names,
                                       source=found[0].source)
        logger.info("BoLID: face embedding from %d of %d images (%s)", len(found), len(frames),
                    ", ".join(f"{n} w={w:g}" for n, w in zip(used_names, used_weights, strict=True)))
        return (embeds,)


class PoseControlError(BoLIDError):
    """Poses cannot be drawn: no size known, or nothing to draw."""


class PosesToOpenPose:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "poses": ("BOLID_POSES", {"tooltip": "poses from Detect Body Pose (BoLID)"}),
            "min_confidence": ("FLOAT", {"default": KEYPOINT_DRAW_CONF, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "joints below this confidence are left out (and their limbs)"}),
            "people": (list(OPENPOSE_PEOPLE), {"default": OPENPOSE_PEOPLE[0],
                                              "tooltip": "draw only the main person, or everyone detected"}),
            "width": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8,
                              "tooltip": "control image width; 0 = the photo's. Set width and height to the "
                                         "generated image's size: the pose is fitted in, centred, never cut"}),
            "height": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8,
                               "tooltip": "control image height; 0 = the photo's"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "render"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Draws BoLID's detected poses (COCO-17) as an OpenPose control image (18 points with a neck, "
                   "the OpenPose colours, on black) for ControlNet OpenPose models: pose from a reference photo, "
                   "identity from BoLID.")

    def render(self, poses: Any, min_confidence: float, people: str, width: int, height: int
               ) -> tuple[torch.Tensor]:
        if people not in OPENPOSE_PEOPLE:
            raise ValueError(f"people must be one of {OPENPOSE_PEOPLE}, got {people!r}")
        sizes = getattr(poses, "sizes", None)
        everyone = getattr(poses, "people", None)
        if not len(poses):
            raise PoseControlError("Poses To OpenPose Image: no poses given")
        if (not width or not height) and sizes is None:
            raise PoseControlError("Poses To OpenPose Image: these poses carry no image size; set width and height")
        target = (width or sizes[0][0], height or sizes[0][1])
        frames = []
        for i, main in enumerate(poses):
            drawn = (everyone[i] if everyone is not None else [main]) if people == OPENPOSE_PEOPLE[1] else [main]
            source = sizes[i] if sizes is not None else target
            scale, offset = fit_into(source, target)
            frames.append(openpose_image(drawn, target[0], target[1], min_confidence, scale, offset))
        return (torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0),)


NODE_CLASS_MAPPINGS = {
    "BoLIDLoadPoseModel": LoadPoseModel,
    "BoLIDLoadInsightFace": LoadInsightFace,
    "BoLIDDetectBodyPose": DetectBodyPose,
    "BoLIDEncodeFace": EncodeFace,
    "BoLIDPosesToOpenPose": PosesToOpenPose,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BoLIDLoadPoseModel": "Load Pose Model (BoLID)",
    "BoLIDLoadInsightFace": "Load InsightFace (BoLID)",
    "BoLIDDetectBodyPose": "Detect Body Pose (BoLID)",
    "BoLIDEncodeFace": "Encode Face (BoLID)",
    "BoLIDPosesToOpenPose": "Poses To OpenPose Image (BoLID)",
}
