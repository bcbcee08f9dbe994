"""The one stand-in for ComfyUI's start-up side that the tests and workflows/build.py share.

- ``load_pack()`` imports the repository the way ComfyUI's custom-node loader does (the folder's __init__.py as a
  package), under one module name, so the tests and the build script share one loaded copy.
- ``folder_paths(models_dir)`` is the part of ComfyUI's ``folder_paths`` module that BoLID's nodes use, written
  from its observable contract (ComfyUI 0.3.64): ``folder_names_and_paths`` maps a folder name to (paths,
  extensions); ``get_folder_paths`` fails on an unknown name; ``get_filename_list`` lists the files of every path
  of a folder whose extension is registered (every file when none is), sorted; ``get_full_path`` gives the first
  path holding the file, or None; ``get_input_directory`` is ComfyUI's input/ folder.
- ``installed(module)`` puts such a module in ``sys.modules`` for a while and restores what was there.

Tests that need a real ComfyUI use the real module instead (COMFYUI_PATH, see conftest.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE_NAME = "bolid_pack"


def load_pack() -> types.ModuleType:
    """The repository as a package, loaded as ComfyUI's custom-node loader does (folder + __init__.py)."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def folder_paths(models_dir: str | os.PathLike, input_dir: str | os.PathLike | None = None,
                 folders: dict[str, tuple[list[str], set[str]]] | None = None) -> types.ModuleType:
    """A ``folder_paths`` module rooted at models_dir; input_dir defaults to input/ beside it; folders are
    registered beforehand (as extra_model_paths.yaml would)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    fp.folder_names_and_paths = {name: (list(paths), set(exts)) for name, (paths, exts) in (folders or {}).items()}
    input_root = Path(input_dir) if input_dir is not None else Path(models_dir).parent / "input"

    def get_folder_paths(name: str) -> list[str]:
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name: str) -> list[str]:
        paths, exts = fp.folder_names_and_paths[name]
        found = {p.name for d in paths if Path(d).is_dir() for p in Path(d).iterdir()
                 if p.is_file() and (not exts or p.suffix.lower() in exts)}
        return sorted(found)

    def get_full_path(name: str, filename: str) -> str | None:
        if name not in fp.folder_names_and_paths:
            return None
        for d in fp.folder_names_and_paths[name][0]:
            candidate = Path(d) / filename
            if candidate.is_file():
                return str(candidate)
        return None

    fp.get_folder_paths, fp.get_filename_list, fp.get_full_path = get_folder_paths, get_filename_list, get_full_path
    fp.get_input_directory = lambda: str(input_root)
    return fp


@contextlib.contextmanager
def installed(module: types.ModuleType) -> Iterator[types.ModuleType]:
    """``module`` as ``sys.modules[module.__name__]`` for the duration; the previous entry (if any) comes back."""
    name = module.__name__
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield module
    finally:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
