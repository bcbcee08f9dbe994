"""Shared test fixtures: load the pack the way ComfyUI does, and find an optional real ComfyUI checkout."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE_NAME = "bolid_pack"


def comfyui_path() -> Path | None:
    """The real ComfyUI checkout named by COMFYUI_PATH, or None."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value)
    return path if (path / "comfy").is_dir() and (path / "folder_paths.py").is_file() else None


def load_pack():
    """Import the repository as a package, as ComfyUI's custom-node loader does (folder + __init__.py)."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def comfyui():
    """Put a real ComfyUI on sys.path (first, so its ``nodes``/``comfy`` win) or skip."""
    path = comfyui_path()
    if path is None:
        pytest.skip("no real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout to run this test")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(autouse=True)
def _no_ultralytics_pil_patch():
    """Tests import ultralytics directly; keep its PIL.Image.open patch from leaking into other tests."""
    from bolid.pose import restore_pil_image_open

    restore_pil_image_open()
    yield
    restore_pil_image_open()
