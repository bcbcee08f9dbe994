"""Photo sets of any size: load every image of a folder under ComfyUI's input/ as a list, uncropped.

Core Image Batch rescales and centre-crops each photo to the first one's size, which cuts off heads or feet of
photos with another aspect ratio: exactly the joints a body identity needs. A list output (``OUTPUT_IS_LIST``)
carries each photo at its own size; BoLID's encode nodes take lists (``INPUT_IS_LIST``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ..bolid.dataset import IMAGE_EXTENSIONS, read_rgb
from ..bolid.errors import BoLIDError
from .comfy_batch import batch_progress
from .comfy_env import folder_paths_module

logger = logging.getLogger("bolid")
CATEGORY = "BoLID/image"


class ImageFolderError(BoLIDError):
    """The chosen folder is not under input/, does not exist, or holds no readable image."""


def input_root() -> Path:
    return Path(folder_paths_module().get_input_directory()).resolve()


def input_subfolders() -> list[str]:
    """Folders under input/ (any depth, relative, '/'-separated) that hold at least one image file."""
    try:
        root = input_root()
    except (OSError, AttributeError):
        return []
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if Path(dirpath) != root and any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in filenames):
            found.append(Path(dirpath).relative_to(root).as_posix())
    return sorted(found)


def folder_images(folder: str) -> list[Path]:
    """The image files of ``input/<folder>`` in name order; the folder must stay inside input/."""
    root = input_root()
    path = (root / folder).resolve()
    if not folder or not path.is_relative_to(root) or path == root:
        raise ImageFolderError(f"folder {folder!r} must be a sub-folder of ComfyUI's input folder ({root})")
    if not path.is_dir():
        raise ImageFolderError(f"folder {path} does not exist: put the photos in a sub-folder of {root}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageFolderError(f"folder {path} has no image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


class LoadImagesFromFolder:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        return {"required": {
            "folder": (input_subfolders(), {"tooltip": "a sub-folder of ComfyUI's input folder; every image in it "
                                                       "(jpg, jpeg, png, webp) is loaded at its own size"}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "names")
    OUTPUT_IS_LIST = (True, True)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads every photo of a folder under input/ as a list, each at its own size (never resized or "
                   "cropped, EXIF rotation applied): connect it to Encode Body From Images or Encode Face.")

    @classmethod
    def IS_CHANGED(cls, folder: str):  # noqa: N802 - a changed, added or removed photo re-runs the node
        try:
            files = folder_images(folder)
        except (BoLIDError, OSError):
            return ""
        h = hashlib.sha256()
        for p in files:
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, folder: str):  # noqa: N802 - refused when queued, not mid-run
        try:
            folder_images(folder)
        except BoLIDError as exc:
            return str(exc)
        return True

    def load(self, folder: str) -> tuple[list[torch.Tensor], list[str]]:
        files = folder_images(folder)
        step = batch_progress(len(files))
        images = []
        for i, path in enumerate(files, start=1):
            try:
                rgb = read_rgb(path)
            except Exception as exc:  # PIL raises several types for damaged files
                raise ImageFolderError(f"cannot read {path} ({type(exc).__name__}: {exc}); remove or replace it") \
                    from exc
            images.append(torch.from_numpy(rgb.copy()).float().div(255.0)[None])
            step(i)
        logger.info("BoLID: loaded %d photo(s) from %s (%s)", len(files), folder,
                    ", ".join(f"{p.name} {im.shape[2]}x{im.shape[1]}" for p, im in zip(files, images, strict=True)))
        return (images, [p.name for p in files])


NODE_CLASS_MAPPINGS = {"BoLIDLoadImagesFromFolder": LoadImagesFromFolder}
NODE_DISPLAY_NAME_MAPPINGS = {"BoLIDLoadImagesFromFolder": "Load Images From Folder (BoLID)"}
