"""Shared test fixtures: the pack loaded the way ComfyUI does, the stand-in ``folder_paths``
(tests/comfy_standin.py), and an optional real ComfyUI checkout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import comfy_standin
import pytest
from comfy_standin import REPO_ROOT, load_pack

__all__ = ["REPO_ROOT", "comfyui_path", "load_pack"]


def comfyui_path() -> Path | None:
    """The real ComfyUI checkout named by COMFYUI_PATH, or None."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value)
    return path if (path / "comfy").is_dir() and (path / "folder_paths.py").is_file() else None


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture
def install_folder_paths(monkeypatch):
    """Installs the stand-in ``folder_paths`` (comfy_standin.folder_paths arguments) for one test; returns it."""
    def install(models_dir, **kwargs):
        fp = comfy_standin.folder_paths(models_dir, **kwargs)
        monkeypatch.setitem(sys.modules, "folder_paths", fp)
        return fp

    return install


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
