"""ComfyUI glue for BoLID: node classes, model patching and model-folder registration.

Each node module exports its own NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS; this file merges them, so a
new module is one line in ``_NODE_MODULES``. Nothing here imports ComfyUI at import time.
"""

from __future__ import annotations

import importlib

from .comfy_env import register_model_folders_if_in_comfyui
from .validate import install_input_checks

_NODE_MODULES = (
    "adapter_nodes",
    "body_nodes",
    "face_nodes",
    "image_nodes",
    "perception_nodes",
)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    for _key, _cls in _module.NODE_CLASS_MAPPINGS.items():
        if _key in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"BoLID node id {_key!r} is defined twice (second time in nodes/{_name}.py)")
        NODE_CLASS_MAPPINGS[_key] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# every node's IMAGE/MASK/number/identity inputs are checked before its function runs (nodes/validate.py)
for _key, _cls in NODE_CLASS_MAPPINGS.items():
    install_input_checks(_cls, NODE_DISPLAY_NAME_MAPPINGS.get(_key, _key))

register_model_folders_if_in_comfyui()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
