"""Face identity nodes: save, load and blend Face IDs, kept like Body IDs.

Face IDs live in the one "bolid_face_ids" folder that both Save and Load use (safetensors, atomic writes, the
Body ID name rules), so a face found once can be reused with text only, without photos or InsightFace.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..bolid.face_id_io import FaceIDFileError, blend_face_ids, face_id_path, load_face_id, save_face_id
from ..bolid.identity import FaceEmbeds
from .comfy_env import folder_paths_module, model_file_list, model_file_path, register_model_folders

logger = logging.getLogger("bolid")
CATEGORY = "BoLID/face"
FACE_IDS_FOLDER = "bolid_face_ids"


def face_ids_folder() -> Path:
    """The folder Save Face ID writes to: the first "bolid_face_ids" path (Load lists all of them)."""
    register_model_folders()
    return Path(folder_paths_module().get_folder_paths(FACE_IDS_FOLDER)[0])


def _face(value: object, what: str) -> FaceEmbeds:
    if not (hasattr(value, "embedding") and hasattr(value, "num_images")):
        raise TypeError(f"{what} must come from Encode Face or Load Face ID (BoLID), got {type(value).__name__}")
    return value  # type: ignore[return-value]


class SaveFaceID:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        return {"required": {
            "face_embeds": ("BOLID_FACE_EMBEDS",),
            "name": ("STRING", {"default": "my_face", "tooltip": "file name in models/bolid_face_ids (letters, "
                                                                 "digits, space, _ - .; no folders)"}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace an existing Face ID of that name"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves a face identity to models/bolid_face_ids so it can be reused without photos."

    def save(self, face_embeds: FaceEmbeds, name: str, overwrite: bool) -> tuple[str]:
        face = _face(face_embeds, "face_embeds")
        path = face_id_path(face_ids_folder(), name)
        save_face_id(face, path, overwrite=overwrite)
        logger.info("BoLID: saved face ID %s (%d values, %d photos)", path, face.embedding.numel(), face.num_images)
        return (path.name,)


class LoadFaceID:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"face_id_name": (model_file_list(FACE_IDS_FOLDER), {
            "tooltip": "a Face ID saved by Save Face ID (models/bolid_face_ids)"})}}

    RETURN_TYPES = ("BOLID_FACE_EMBEDS",)
    RETURN_NAMES = ("face_embeds",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a face identity saved by Save Face ID (models/bolid_face_ids); no photo, no InsightFace."

    @classmethod
    def IS_CHANGED(cls, face_id_name: str):  # noqa: N802 - a re-saved file must be re-read
        try:
            st = os.stat(model_file_path(FACE_IDS_FOLDER, face_id_name))
        except (OSError, FileNotFoundError):
            return ""
        return f"{st.st_mtime_ns}-{st.st_size}"

    def load(self, face_id_name: str) -> tuple[FaceEmbeds]:
        path = Path(model_file_path(FACE_IDS_FOLDER, face_id_name)).resolve()
        roots = [Path(p).resolve() for p in folder_paths_module().get_folder_paths(FACE_IDS_FOLDER)]
        if not any(path.is_relative_to(r) for r in roots):
            raise FaceIDFileError(f"face ID {face_id_name!r} is outside the bolid_face_ids folders")
        return (load_face_id(path),)


class BlendFaceIDs:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "face_embeds_a": ("BOLID_FACE_EMBEDS",),
            "face_embeds_b": ("BOLID_FACE_EMBEDS",),
            "t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "0 = a, 1 = b"}),
            "method": (["slerp", "linear"], {"default": "slerp", "tooltip": "slerp follows the unit sphere of "
                                                                             "face embeddings; linear mixes and "
                                                                             "renormalises"}),
        }}

    RETURN_TYPES = ("BOLID_FACE_EMBEDS",)
    RETURN_NAMES = ("face_embeds",)
    FUNCTION = "blend"
    CATEGORY = CATEGORY
    DESCRIPTION = "Interpolates two face identities of the same face model; the result is a unit embedding."

    def blend(self, face_embeds_a: FaceEmbeds, face_embeds_b: FaceEmbeds, t: float, method: str
              ) -> tuple[FaceEmbeds]:
        return (blend_face_ids(_face(face_embeds_a, "face_embeds_a"), _face(face_embeds_b, "face_embeds_b"), t,
                               method),)


NODE_CLASS_MAPPINGS = {
    "BoLIDSaveFaceID": SaveFaceID,
    "BoLIDLoadFaceID": LoadFaceID,
    "BoLIDBlendFaceIDs": BlendFaceIDs,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BoLIDSaveFaceID": "Save Face ID (BoLID)",
    "BoLIDLoadFaceID": "Load Face ID (BoLID)",
    "BoLIDBlendFaceIDs": "Blend Face IDs (BoLID)",
}
