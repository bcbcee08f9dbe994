"""Which ComfyUI models BoLID can patch, and where: the cross-attention layers of an SD1.5/SDXL-architecture
UNet in the adapter's order, the check that an adapter file fits them, the refusal of other families by name, and
the dtype ComfyUI computes those layers in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..bolid.config import AdapterConfig, describe_layout
from ..bolid.errors import AdapterMismatchError, UnsupportedModelError

LayerKey = tuple[str, int, int]  # ComfyUI's attn2 replace-patch key: (block name, block index, transformer index)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_FAMILIES = "SD1.5 and SDXL-architecture UNets (incl. Lightning/Turbo/Hyper finetunes)"


@dataclass(frozen=True)
class ComfyLayer:
    """One cross-attention layer of a ComfyUI UNet: its replace-patch key and dimensions."""

    key: LayerKey
    hidden_size: int
    context_dim: int


def enumerate_cross_attention_layers(diffusion_model: torch.nn.Module) -> list[ComfyLayer]:
    """Cross-attention layers in ComfyUI firing order: input blocks, middle block (as ("middle", 0, i)), output."""
    layers: list[ComfyLayer] = []

    def visit(block_name: str, number: int, block: torch.nn.Module) -> None:
        for module in block.children() if isinstance(block, torch.nn.Sequential) else [block]:
            for index, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                attn2 = getattr(transformer, "attn2", None)
                if attn2 is not None:
                    hidden, context = attn2.to_k.weight.shape
                    layers.append(ComfyLayer((block_name, number, index), int(hidden), int(context)))

    for number, block in enumerate(diffusion_model.input_blocks):
        visit("input", number, block)
    visit("middle", 0, diffusion_model.middle_block)
    for number, block in enumerate(diffusion_model.output_blocks):
        visit("output", number, block)
    return layers


def adapter_layer_order(layers: Sequence[ComfyLayer]) -> list[ComfyLayer]:
    """Reorder ComfyUI's layers (input, middle, output) into the adapter's diffusers order (down, up, mid)."""
    by_block = {name: [layer for layer in layers if layer.key[0] == name] for name in ("input", "output", "middle")}
    return by_block["input"] + by_block["output"] + by_block["middle"]


def check_adapter_fits(config: AdapterConfig, layers: Sequence[ComfyLayer]) -> list[ComfyLayer]:
    """Map the model's layers to adapter indices, or raise an error naming both layouts."""
    ordered = adapter_layer_order(layers)
    model_ctx = ordered[0].context_dim if ordered else 0
    model_desc = describe_layout(len(ordered), model_ctx)
    if len(ordered) != config.num_layers or model_ctx != config.context_dim:
        raise AdapterMismatchError(
            f"BoLID adapter is {config.describe()}, model is {model_desc}: load the adapter trained for this "
            "model family"
        )
    for index, (layer, hidden) in enumerate(zip(ordered, config.hidden_sizes, strict=True)):
        if layer.hidden_size != hidden or layer.context_dim != config.context_dim:
            raise AdapterMismatchError(
                f"BoLID adapter layer {index} expects inner dim {hidden} / ctx {config.context_dim}, model layer "
                f"{layer.key} has {layer.hidden_size} / {layer.context_dim} (adapter {config.describe()}, model "
                f"{model_desc})"
            )
    return ordered


def model_family(model: Any) -> str:
    """ComfyUI's name for the model's family (its model_config class: SD15, SDXL, Flux, SD3, ...)."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if config is not None:
        return type(config).__name__
    return type(base).__name__ if base is not None else type(model).__name__


def supported_cross_attention_layers(model: Any) -> list[ComfyLayer]:
    """The model's cross-attention layers, or a refusal naming the family for anything BoLID cannot patch.

    BoLID's adapters exist for UNets with SD1.5/SDXL's block layout. DiT models (Flux, SD3, ...) have no
    such layers, video UNets add temporal blocks, and SD2.x (ctx 1024) has no BoLID adapter.
    """
    diffusion_model = model.get_model_object("diffusion_model")
    family = model_family(model)
    kind = type(diffusion_model).__name__
    if not all(hasattr(diffusion_model, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModelError(
            f"Apply BoLID Adapter: the model is {family} ({kind}), not a UNet with SD1.5/SDXL cross-attention "
            f"blocks; BoLID supports {SUPPORTED_FAMILIES}. Connect an SD1.5 or SDXL checkpoint's MODEL")
    if "Video" in kind or any(hasattr(m, "time_stack") for m in diffusion_model.modules()):
        raise UnsupportedModelError(
            f"Apply BoLID Adapter: the model is {family} ({kind}), a video UNet with temporal blocks; BoLID "
            f"supports {SUPPORTED_FAMILIES}")
    layers = enumerate_cross_attention_layers(diffusion_model)
    if not layers:
        raise UnsupportedModelError(
            f"Apply BoLID Adapter: the model is {family} ({kind}) and has no cross-attention layers; BoLID "
            f"supports {SUPPORTED_FAMILIES}")
    context = layers[0].context_dim
    if context == 1024 or family.startswith(("SD2", "SD21")):
        raise UnsupportedModelError(
            f"Apply BoLID Adapter: the model is SD2.x ({family}, text context {context}); BoLID has no SD2 "
            f"adapter and supports {SUPPORTED_FAMILIES} (text context 768 / 2048)")
    return layers


def compute_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """A dtype to compute in: fp16/bf16/fp32 stay, storage-only types (fp8, ...) and None become fp32."""
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


def model_compute_dtype(model: Any) -> torch.dtype:
    """The dtype ComfyUI runs this model's layers in: its manual-cast dtype when the weights are stored in
    another one (fp8 checkpoints, ``--fp8_e4m3fn-unet``), else its weight dtype."""
    base = getattr(model, "model", None)
    dtype = getattr(base, "manual_cast_dtype", None)
    if dtype is None and hasattr(base, "get_dtype"):
        dtype = base.get_dtype()
    return compute_dtype(dtype)
