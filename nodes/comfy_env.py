"""Lazy access to ComfyUI modules and BoLID's model folders.

ComfyUI modules are imported inside functions so that the pack imports (and its pure parts are testable)
without ComfyUI. Folder registration keeps every path that extra_model_paths.yaml already added.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

from ..bolid.errors import BoLIDError

logger = logging.getLogger("bolid")

# folder name -> (default subfolder under ComfyUI's models dir, file extensions)
MODEL_FOLDERS: dict[str, tuple[str, frozenset[str]]] = {
    "bolid": ("bolid", frozenset({".safetensors"})),  # pickles are never loaded, so never listed
    "bolid_pose": ("bolid_pose", frozenset({".onnx"})),
    "bolid_body_ids": ("bolid_body_ids", frozenset({".safetensors"})),
    "bolid_face_ids": ("bolid_face_ids", frozenset({".safetensors"})),
}


class ModelFileNotFoundError(BoLIDError, FileNotFoundError):
    """A model file chosen in a node is not in any of its folders (also a FileNotFoundError for callers)."""


def folder_paths_module() -> ModuleType:
    """ComfyUI's ``folder_paths`` module; a clear error outside ComfyUI."""
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - only outside ComfyUI
        raise RuntimeError("BoLID nodes need ComfyUI's folder_paths module: run them inside ComfyUI") from exc
    return folder_paths


def register_model_folders() -> None:
    """Add BoLID's folders to ComfyUI without dropping paths or extensions configured elsewhere."""
    fp = folder_paths_module()
    for name, (subdir, extensions) in MODEL_FOLDERS.items():
        default = os.path.join(fp.models_dir, subdir)
        if name in fp.folder_names_and_paths:
            paths, exts = fp.folder_names_and_paths[name]
            paths = list(paths)
            if default not in paths:
                paths.append(default)
            fp.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))
        else:
            fp.folder_names_and_paths[name] = ([default], set(extensions))


def register_model_folders_if_in_comfyui() -> None:
    """Called at pack import: inside ComfyUI the folders exist before any node lists its files."""
    try:
        import folder_paths  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return
    register_model_folders()


def model_file_list(folder: str) -> list[str]:
    fp = folder_paths_module()
    register_model_folders()
    return fp.get_filename_list(folder)


def model_file_path(folder: str, name: str) -> str:
    """Full path of a model file, or an error that names the file and the folders searched."""
    fp = folder_paths_module()
    register_model_folders()
    path = fp.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(fp.get_folder_paths(folder))
        raise ModelFileNotFoundError(f"BoLID: model file {name!r} not found in the {folder!r} folders: {searched}")
    return path


@functools.cache
def comfy_optimized_attention():
    """ComfyUI's attention function (resolved once), or None outside ComfyUI."""
    try:
        from comfy.ldm.modules.attention import optimized_attention  # type: ignore[import-not-found]
    except ImportError:
        return None
    return optimized_attention
