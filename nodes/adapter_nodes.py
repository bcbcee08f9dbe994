"""Nodes "Load Adapter (BoLID)" and "Apply Adapter (BoLID)"."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..bolid.adapter import NO_BODY_BRANCH, BoLIDAdapter, Branch, MissingBranchError
from ..bolid.adapter_io import BODY_ENCODER_HASH_KEY, load_adapter
from ..bolid.errors import EmbeddingError
from ..bolid.identity import BodyID, FaceEmbeds, complete_identity
from .comfy_env import model_file_list, model_file_path
from .comfy_layers import check_adapter_fits, compute_dtype, model_compute_dtype, supported_cross_attention_layers
from .comfy_patch import BoLIDPatchState, register_patches
from .validate import warn_if_body_id_unverified

logger = logging.getLogger("bolid")
CATEGORY = "BoLID"


@dataclass(frozen=True)
class LoadedAdapter:
    """Socket value BOLID_ADAPTER: the module plus the ModelPatcher that lets ComfyUI move/offload it."""

    adapter: BoLIDAdapter
    name: str
    patcher: Any = None
    body_encoder_hash: str = ""  # the Body-ID encoder the adapter was trained with, when the file records it


def wrap_for_memory_manager(module: torch.nn.Module) -> Any:
    """A ComfyUI ModelPatcher around a module so load_models_gpu moves, counts and offloads it (None outside)."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
        import comfy.model_patcher  # type: ignore[import-not-found]
    except ImportError:
        return None
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _comfy_unet_dtype() -> torch.dtype | None:
    """The dtype ComfyUI computes UNets in (fp16/bf16 on most GPUs), never a storage-only type such as fp8
    (``--fp8_e4m3fn-unet``): those layers cannot run a LayerNorm or Linear."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    dtype = mm.unet_dtype()
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = mm.unet_manual_cast(dtype, mm.get_torch_device())
    return compute_dtype(dtype)


def _identity_kv_device(loaded: LoadedAdapter) -> None:
    """Inside ComfyUI, put the adapter on the compute device to derive the identity K/V there (fast);
    sampling itself only needs the small K/V module, so the manager may offload the adapter afterwards."""
    if loaded.patcher is None:
        return
    import comfy.model_management as mm  # type: ignore[import-not-found]

    mm.load_models_gpu([loaded.patcher])


def _offload(module: torch.nn.Module) -> torch.nn.Module:
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return module
    return module.to(mm.unet_offload_device())


class LoadBoLIDAdapter:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        return {"required": {"adapter_name": (model_file_list("bolid"), {
            "tooltip": "a BoLID adapter (.safetensors) in models/bolid, made by stage-2 training; it must match the "
                       "checkpoint's family (SD1.5 or SDXL)"})}}

    RETURN_TYPES = ("BOLID_ADAPTER",)
    RETURN_NAMES = ("bolid_adapter",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a BoLID adapter (.safetensors) from models/bolid; its config is checked before any tensor."

    def load(self, adapter_name: str) -> tuple[LoadedAdapter]:
        path = model_file_path("bolid", adapter_name)
        adapter, info = load_adapter(path, dtype=_comfy_unet_dtype())
        encoder_hash = info.metadata.get(BODY_ENCODER_HASH_KEY, "")
        logger.info("BoLID: loaded adapter %s (%s)", adapter_name, adapter.config.describe())
        return (LoadedAdapter(adapter, adapter_name, wrap_for_memory_manager(adapter), encoder_hash),)


def _identity_embeds(adapter: BoLIDAdapter, body_id: BodyID | None, face_embeds: FaceEmbeds | None,
                     trained_hash: str = "", weight_body: float = 0.0) -> dict[Branch, torch.Tensor]:
    config = adapter.config
    embeds: dict[Branch, torch.Tensor] = {}
    if not config.body_branch:
        # a face-only adapter (IP-Adapter FaceID import): say so instead of silently dropping the body
        if body_id is not None and face_embeds is None:
            raise MissingBranchError(f"Apply BoLID Adapter got only a body_id, but {NO_BODY_BRANCH}; connect "
                                     "face_embeds, or load an adapter trained with a body branch")
        if body_id is not None or weight_body != 0:
            logger.warning("BoLID: %s: body_id and weight_body are ignored", NO_BODY_BRANCH)
        body_id = None
    if face_embeds is not None:
        if face_embeds.embedding.numel() != config.face_embed_dim:
            raise EmbeddingError(f"face embedding has {face_embeds.embedding.numel()} values, the adapter expects "
                                 f"{config.face_embed_dim} (an InsightFace ArcFace embedding)")
        embeds["face"] = face_embeds.embedding.reshape(1, -1)
    if body_id is not None:
        if body_id.dim != config.body_dim:
            raise EmbeddingError(f"body identity has {body_id.dim} dims, the adapter expects {config.body_dim}: "
                                 "encode it with the Body-ID encoder this adapter was trained with")
        embeds["body"] = body_id.c_body.reshape(1, -1)
        if trained_hash and body_id.encoder_hash and body_id.encoder_hash != trained_hash:
            raise EmbeddingError(f"body identity comes from Body-ID encoder {body_id.encoder_hash}, the adapter was "
                                 f"trained with encoder {trained_hash}: encode the body with that encoder")
    if not embeds:
        raise EmbeddingError("Apply Adapter (BoLID) needs a body_id and/or face_embeds input; neither is connected")
    # An unconnected identity is the zero embedding: exactly what the adapter saw in training for a missing or
    # dropped face/body, so body-only (text-only mode) and face-only runs match training.
    face, body = complete_identity(config, embeds.get("face"), embeds.get("body"))
    return {"face": face} if body is None else {"face": face, "body": body}


class ApplyBoLIDAdapter:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        return {
            "required": {
                "model": ("MODEL",),
                "bolid_adapter": ("BOLID_ADAPTER",),
                "weight_face": ("FLOAT", {"default": 0.8, "min": -1.0, "max": 3.0, "step": 0.05,
                                          "tooltip": "strength of the face branch; 0 switches it off"}),
                "weight_body": ("FLOAT", {"default": 0.8, "min": -1.0, "max": 3.0, "step": 0.05,
                                          "tooltip": "strength of the body branch; 0 switches it off"}),
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "fraction of the sampling schedule where the branches start "
                                                  "acting (0 = first step)"}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "fraction of the schedule where they stop (1 = last step); must "
                                                "not be before start_at"}),
            },
            "optional": {
                "body_id": ("BOLID_BODY_ID",),
                "face_embeds": ("BOLID_FACE_EMBEDS",),
                "attn_mask": ("MASK",),
                "attn_mask_face": ("MASK", {"tooltip": "Where the face branch acts; replaces attn_mask for it. "
                                                       "Same batch rule as attn_mask."}),
                "attn_mask_body": ("MASK", {"tooltip": "Where the body branch acts; replaces attn_mask for it. "
                                                       "Same batch rule as attn_mask."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Adds BoLID's face and body cross-attention branches to every cross-attention layer, with "
                   "separate weights, active between start_at and end_at of the sampling schedule.")

    def apply(self, model: Any, bolid_adapter: LoadedAdapter, weight_face: float, weight_body: float,
              start_at: float, end_at: float, body_id: BodyID | None = None, face_embeds: FaceEmbeds | None = None,
              attn_mask: torch.Tensor | None = None, attn_mask_face: torch.Tensor | None = None,
              attn_mask_body: torch.Tensor | None = None) -> tuple[Any]:
        if start_at > end_at:
            raise ValueError(f"Apply Adapter (BoLID): start_at ({start_at}) is after end_at ({end_at})")
        adapter = bolid_adapter.adapter
        ordered = check_adapter_fits(adapter.config, supported_cross_attention_layers(model))
        embeds = _identity_embeds(adapter, body_id, face_embeds, bolid_adapter.body_encoder_hash, weight_body)
        warn_if_body_id_unverified(body_id, bolid_adapter.name, bolid_adapter.body_encoder_hash)
        sampling = model.get_model_object("model_sampling")
        branch_masks = {b: m for b, m in (("face", attn_mask_face), ("body", attn_mask_body)) if m is not None}
        weights = {"face": float(weight_face), "body": float(weight_body)}
        if any(weights.values()):
            _identity_kv_device(bolid_adapter)
        state = BoLIDPatchState(
            adapter=adapter, embeds=embeds, weights=weights,
            sigma_start=float(sampling.percent_to_sigma(start_at)), sigma_end=float(sampling.percent_to_sigma(end_at)),
            mask=attn_mask, branch_masks=branch_masks, kv_dtype=model_compute_dtype(model),
        )
        _offload(state.identity_kv)
        kv_patcher = wrap_for_memory_manager(state.identity_kv) if state.active_branches() else None
        if kv_patcher is not None:
            state.memory_models.append(kv_patcher)
        patched = register_patches(model, state, ordered)
        logger.info("BoLID: patched %d cross-attention layers (face %.2f, body %.2f, branches: %s)", len(ordered),
                    weight_face, weight_body, ", ".join(embeds))
        return (patched,)


NODE_CLASS_MAPPINGS = {"BoLIDLoadAdapter": LoadBoLIDAdapter, "BoLIDApplyAdapter": ApplyBoLIDAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"BoLIDLoadAdapter": "Load Adapter (BoLID)", "BoLIDApplyAdapter": "Apply Adapter (BoLID)"}
