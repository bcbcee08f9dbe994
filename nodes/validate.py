"""One validation layer for every node input, applied by socket type before the node function runs.

``install_input_checks`` wraps each registered node's FUNCTION (nodes/__init__.py does it for every class in
NODE_CLASS_MAPPINGS), so a new node inherits the checks without calling anything: its IMAGE, MASK, FLOAT/INT,
BOLID_BODY_ID and BOLID_FACE_EMBEDS inputs are checked from the types its INPUT_TYPES declares. Errors name the
node, the input and, for batches, the item ("image 2 of 3"). The checks themselves are pure (bolid/validation.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..bolid.validation import (
    check_body_vector,
    check_face_vector,
    check_finite_batch,
    check_finite_number,
    check_image_size,
)
from .comfy_batch import image_names

logger = logging.getLogger("bolid")

_CHECKED = "__bolid_input_checks__"
_TYPE_CACHE: dict[type, dict[str, str]] = {}


def declared_input_types(cls: type) -> dict[str, str]:
    """Input name -> socket type string from the node's INPUT_TYPES (combo lists become "COMBO").

    INPUT_TYPES may list model files and so need ComfyUI's folder_paths; where it cannot run (tests, tools), the
    result is empty and ``infer_input_type`` classifies the values instead. Types never change, so they are cached.
    """
    if cls in _TYPE_CACHE:
        return _TYPE_CACHE[cls]
    try:
        spec = cls.INPUT_TYPES()
    except Exception:  # folder_paths missing outside ComfyUI, or a file listing failed
        return {}
    types: dict[str, str] = {}
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
            types[name] = kind if isinstance(kind, str) else "COMBO"
    _TYPE_CACHE[cls] = types
    return types


def infer_input_type(value: Any) -> str | None:
    """The socket type a value most likely came from, when INPUT_TYPES could not be read."""
    if hasattr(value, "c_body"):
        return "BOLID_BODY_ID"
    if hasattr(value, "embedding") and hasattr(value, "num_images"):
        return "BOLID_FACE_EMBEDS"
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return "FLOAT"
    if isinstance(value, torch.Tensor):
        return "IMAGE" if value.ndim == 4 and value.shape[-1] in (1, 3, 4) else "MASK"
    return None


def check_image_input(images: Any, what: str) -> None:
    """An IMAGE batch [B, H, W, C] (or one [H, W, C]): non-empty, photo-like shape, every value finite."""
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        return  # the IMAGE conversion reports wrong types, ranks and empty batches with the expected layout
    if images.ndim == 3:
        images = images[None]
    if images.shape[0] == 0:
        return
    count = images.shape[0]
    check_image_size(int(images.shape[1]), int(images.shape[2]), what)
    check_finite_batch(images, image_names(count), what)


def check_mask_input(mask: Any, what: str) -> None:
    """A MASK: every value finite (NaN areas would make the attention output NaN). Shape rules: comfy_patch."""
    if not isinstance(mask, torch.Tensor) or mask.ndim == 0:
        return
    batch = mask if mask.ndim >= 3 else mask[None]
    names = [f"mask {i + 1} of {batch.shape[0]}" for i in range(batch.shape[0])]
    check_finite_batch(batch, names, what)


def check_value(kind: str, value: Any, what: str) -> None:
    """Check one input value of socket type ``kind``; unknown types and None (unconnected) pass."""
    if value is None:
        return
    if kind == "IMAGE":
        check_image_input(value, what)
    elif kind == "MASK":
        check_mask_input(value, what)
    elif kind in ("FLOAT", "INT"):
        check_finite_number(value, what)
    elif kind == "BOLID_BODY_ID" and hasattr(value, "c_body"):
        check_body_vector(value.c_body, f"{what}: body identity c_body")
        if getattr(value, "logvar", None) is not None:
            check_finite_batch(value.logvar.reshape(1, -1), ["its logvar"], f"{what}: body identity")
    elif kind == "BOLID_FACE_EMBEDS" and hasattr(value, "embedding"):
        check_face_vector(value.embedding, f"{what}: face embedding")


def check_node_inputs(cls: type, title: str, arguments: Mapping[str, Any]) -> None:
    """Check every argument of a node call by its declared (else inferred) socket type."""
    declared = declared_input_types(cls)
    for name, value in arguments.items():
        kind = declared.get(name) or infer_input_type(value)
        if kind is not None:
            check_value(kind, value, f"{title}: input '{name}'")


def install_input_checks(cls: type, title: str) -> None:
    """Wrap ``cls.FUNCTION`` so that its inputs are checked first (idempotent; the signature is kept)."""
    function_name = getattr(cls, "FUNCTION", None)
    # the plain function as defined (possibly on a base class); static/class methods have no ``self`` to pass
    function: Callable[..., Any] | None = next(
        (k.__dict__[function_name] for k in cls.__mro__ if function_name and function_name in k.__dict__), None)
    if not inspect.isfunction(function) or getattr(function, _CHECKED, False):
        return
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return function(self, *args, **kwargs)  # Python's own message for a wrong call
        arguments = {}
        for name, value in list(bound.arguments.items())[1:]:  # without self
            kind = signature.parameters[name].kind
            arguments.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        check_node_inputs(cls, title, arguments)
        return function(self, *args, **kwargs)

    setattr(checked, _CHECKED, True)
    setattr(cls, function_name, checked)


def warn_if_body_id_unverified(body_id: Any, adapter_name: str, trained_hash: str) -> bool:
    """Log a warning when an adapter records its Body-ID encoder but the Body ID records none (True if so).

    Such identities (saved from a bare tensor, or by an older BoLID) cannot be checked against the adapter's
    encoder: if they come from another encoder the body branch gets a meaningless vector.
    """
    if body_id is None or not trained_hash or getattr(body_id, "encoder_hash", ""):
        return False
    extra = getattr(body_id, "extra", None) or {}
    views = getattr(body_id, "views", ()) or ()
    origin = extra.get("source") if isinstance(extra, dict) and extra.get("source") else (
        f"encoded from {len(views)} view(s)" if views else "unknown origin")
    logger.warning("BoLID: the body identity (%d dims, %s) records no Body-ID encoder hash, but adapter %s was "
                   "trained with encoder %s: BoLID cannot check that they match. Re-encode the body with that "
                   "encoder (Encode Body From Images) and save it again to make this check possible.",
                   getattr(body_id, "dim", 0), origin, adapter_name, trained_hash)
    return True
