"""Nodes "Load Adapter (BoLID)" and "Apply Adapter (BoLID)"."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..bolid.adapter import NO_BODY_BRANCH, BoLIDAdapter, Branch, MissingBranchError
from ..bolid.adapter_io import BODY_ENCODER_HASH_KEY, load_adapter
from ..bolid.errors import EmbeddingError
from ..bolid.identity import BodyID, FaceEmbeds
from ..bolid.safetensors_io import read_safetensors_metadata
from .comfy_env import model_file_list, model_file_path
from .comfy_patch import BoLIDAttn2Patch, BoLIDPatchState, check_adapter_fits, enumerate_cross_attention_layers
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


def wrap_for_memory_manager(adapter: BoLIDAdapter) -> Any:
    """A ComfyUI ModelPatcher around the adapter so load_models_gpu moves it with the UNet (None outside)."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
        import comfy.model_patcher  # type: ignore[import-not-found]
    except ImportError:
        return None
    return comfy.model_patcher.ModelPatcher(adapter, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _comfy_unet_dtype() -> torch.dtype | None:
    """The dtype ComfyUI runs UNets in (fp16/bf16 on most GPUs): the adapter's K/V weights need no more."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mm.unet_dtype()


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
        adapter = load_adapter(path, dtype=_comfy_unet_dtype())
        encoder_hash = read_safetensors_metadata(path).get(BODY_ENCODER_HASH_KEY, "")
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
    if "face" not in embeds:
        embeds["face"] = torch.zeros(1, config.face_embed_dim)
    if "body" not in embeds and config.body_branch:
        embeds["body"] = torch.zeros(1, config.body_dim)
    return embeds


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
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Adds BoLID's face and body cross-attention branches to every cross-attention layer, with "
                   "separate weights, active between start_at and end_at of the sampling schedule.")

    def apply(self, model: Any, bolid_adapter: LoadedAdapter, weight_face: float, weight_body: float,
              start_at: float, end_at: float, body_id: BodyID | None = None, face_embeds: FaceEmbeds | None = None,
              attn_mask: torch.Tensor | None = None) -> tuple[Any]:
        if start_at > end_at:
            raise ValueError(f"Apply Adapter (BoLID): start_at ({start_at}) is after end_at ({end_at})")
        adapter = bolid_adapter.adapter
        layers = enumerate_cross_attention_layers(model.get_model_object("diffusion_model"))
        ordered = check_adapter_fits(adapter.config, layers)
        embeds = _identity_embeds(adapter, body_id, face_embeds, bolid_adapter.body_encoder_hash, weight_body)
        warn_if_body_id_unverified(body_id, bolid_adapter.name, bolid_adapter.body_encoder_hash)
        sampling = model.get_model_object("model_sampling")
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.ndim == 3 else attn_mask.reshape(1, *attn_mask.shape[-2:])
        state = BoLIDPatchState(
            adapter=adapter, embeds=embeds, weights={"face": float(weight_face), "body": float(weight_body)},
            sigma_start=float(sampling.percent_to_sigma(start_at)), sigma_end=float(sampling.percent_to_sigma(end_at)),
            mask=mask, adapter_models=[bolid_adapter.patcher] if bolid_adapter.patcher is not None else [],
        )
        patched = model.clone()
        existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for index, layer in enumerate(ordered):
            wrapped = existing.get(layer.key) or existing.get(layer.key[:2])
            patched.set_model_attn2_replace(BoLIDAttn2Patch(state, index, wrapped), *layer.key)
        logger.info("BoLID: patched %d cross-attention layers (face %.2f, body %.2f, branches: %s)", len(ordered),
                    weight_face, weight_body, ", ".join(embeds))
        return (patched,)


NODE_CLASS_MAPPINGS = {"BoLIDLoadAdapter": LoadBoLIDAdapter, "BoLIDApplyAdapter": ApplyBoLIDAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"BoLIDLoadAdapter": "Load Adapter (BoLID)", "BoLIDApplyAdapter": "Apply Adapter (BoLID)"}
