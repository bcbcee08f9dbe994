"""IP-Adapter FaceID files as BoLID's face branch (no training needed for face identity).

BoLID's face branch has the layout of IP-Adapter FaceID (non-Plus): an MLP projection of the 512-d normed ArcFace
embedding (``proj.0`` 512 -> 1024, GELU, ``proj.2`` -> ctx x tokens, ``norm``) and ``to_k_ip`` / ``to_v_ip`` per
cross-attention processor, numbered 1, 3, 5, ... in diffusers order. A public FaceID file can therefore be
imported as a BoLID adapter whose face branch holds its weights; such an adapter has no body branch (stage 2
adds one, see ``[adapter] face_init`` in the stage-2 config).

What is read: ``.safetensors`` directly; ``.bin`` / ``.pt`` / ``.pth`` only through
``torch.load(weights_only=True)`` (tensors and plain containers, never arbitrary objects). What is refused:
FaceID Plus / Plus v2 (their projection also needs CLIP-vision features and a perceiver resampler), and
image-prompt IP-Adapters (their projection takes a CLIP image embedding, not an ArcFace one). What is ignored:
the LoRA weights of the attention processors that FaceID files carry; load the FaceID LoRA file that comes with
them through ComfyUI's core ``LoraLoaderModelOnly``, as the FaceID authors recommend.

CLI::

    python -m bolid.faceid import ip-adapter-faceid_sd15.bin --out ComfyUI/models/bolid/faceid_sd15.safetensors
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import BoLIDAdapter, layer_key
from .adapter_io import read_adapter_config, save_adapter
from .config import AdapterConfig
from .errors import AdapterFileError
from .safetensors_io import load_safetensors

logger = logging.getLogger("bolid")

FACEID_SOURCE_KEY = "bolid_faceid_source"  # metadata: the FaceID file the face branch came from
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
LORA_NOTE = ("load the FaceID LoRA (e.g. ip-adapter-faceid_sd15_lora.safetensors) with ComfyUI's core "
             "'LoraLoaderModelOnly' (strength ~0.6), as the FaceID authors recommend")
_LAYER_KEY = re.compile(r"^(\d+)\.(to_[kv]_ip)\.weight$")


class FaceIDFileError(AdapterFileError):
    """A file that is not an importable IP-Adapter FaceID file (the message says what it is and why)."""


@dataclass(frozen=True)
class FaceIDImport:
    """The imported adapter plus what was left out (for the log and the file's metadata)."""

    adapter: BoLIDAdapter
    lora_keys_ignored: int
    source: str


def read_ip_adapter_file(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` of an IP-Adapter file, read without a full unpickle."""
    path = Path(path)
    if not path.is_file():
        raise FaceIDFileError(f"FaceID file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        flat, _ = load_safetensors(path, FaceIDFileError)
        parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in parts and rest:
                parts[head][rest] = value
        if not parts["image_proj"] and not parts["ip_adapter"]:
            raise FaceIDFileError(f"{path}: no 'image_proj.*' or 'ip_adapter.*' tensors: not an IP-Adapter file")
        return parts
    if suffix not in PICKLE_SUFFIXES:
        raise FaceIDFileError(f"{path}: unsupported file type {suffix!r}; FaceID files are .bin or .safetensors")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        # torch's own message suggests weights_only=False; only its reason is passed on
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        reason = found.group(1) if found else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FaceIDFileError(f"{path}: cannot be read as plain tensors with torch.load(weights_only=True) ({reason}); "
                              "BoLID never unpickles arbitrary objects: use the .safetensors version of the file"
                              ) from exc
    if not isinstance(raw, Mapping) or not isinstance(raw.get("image_proj"), Mapping) \
            or not isinstance(raw.get("ip_adapter"), Mapping):
        keys = sorted(raw)[:5] if isinstance(raw, Mapping) else type(raw).__name__
        raise FaceIDFileError(f"{path}: not an IP-Adapter file (expected the tables 'image_proj' and 'ip_adapter', "
                              f"found {keys})")
    return {"image_proj": dict(raw["image_proj"]), "ip_adapter": dict(raw["ip_adapter"])}


def _refuse_non_faceid(proj: Mapping[str, torch.Tensor], source: str) -> None:
    if any(k.startswith("perceiver_resampler.") for k in proj):
        raise FaceIDFileError(
            f"{source}: this is IP-Adapter FaceID Plus / Plus v2 (its projection feeds the ArcFace tokens through a "
            "perceiver resampler over CLIP-vision image features); BoLID's face branch is the plain FaceID MLP of "
            "the ArcFace embedding alone. Use ip-adapter-faceid_sd15.bin / ip-adapter-faceid_sdxl.bin (non-Plus)")
    if any(k.startswith(("latents", "proj_in", "layers.")) for k in proj):
        raise FaceIDFileError(f"{source}: this is an IP-Adapter Plus (resampler over CLIP image features), not "
                              "FaceID; BoLID imports only the FaceID files (ArcFace embedding -> MLP)")
    need = ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias")
    missing = [k for k in need if k not in proj]
    if missing:
        found = ", ".join(sorted(proj)[:6]) or "nothing"
        raise FaceIDFileError(f"{source}: image_proj is not the FaceID MLP (missing {', '.join(missing)}; found "
                              f"{found}); only non-Plus IP-Adapter FaceID files can be imported")
    extra = sorted(set(proj) - set(need))
    if extra:
        raise FaceIDFileError(f"{source}: image_proj has keys the FaceID MLP does not ({', '.join(extra[:5])}); "
                              "only non-Plus IP-Adapter FaceID files can be imported")


def faceid_config(parts: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> tuple[AdapterConfig, list[str]]:
    """The face-only AdapterConfig a FaceID state dict implies, and the LoRA keys that will be ignored."""
    proj, layers = parts["image_proj"], parts["ip_adapter"]
    _refuse_non_faceid(proj, source)
    w0, w2, norm = proj["proj.0.weight"], proj["proj.2.weight"], proj["norm.weight"]
    in_dim, hidden = int(w0.shape[1]), int(w0.shape[0])
    ctx = int(norm.shape[0])
    if in_dim != 512:
        raise FaceIDFileError(f"{source}: the projection takes {in_dim}-d inputs; FaceID takes the 512-d ArcFace "
                              "embedding (a 1024/1280-d input is a CLIP image embedding: an image IP-Adapter)")
    if hidden % in_dim or int(w2.shape[1]) != hidden or int(w2.shape[0]) % ctx:
        raise FaceIDFileError(f"{source}: inconsistent FaceID projection shapes proj.0 {tuple(w0.shape)}, "
                              f"proj.2 {tuple(w2.shape)}, norm {tuple(norm.shape)}")
    tokens = int(w2.shape[0]) // ctx
    kv: dict[int, dict[str, torch.Tensor]] = {}
    lora = []
    for key, value in layers.items():
        match = _LAYER_KEY.match(key)
        if match:
            kv.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif "_lora." in key:
            lora.append(key)
        else:
            raise FaceIDFileError(f"{source}: unexpected key ip_adapter.{key} (not to_k_ip/to_v_ip or a LoRA weight)")
    indices = sorted(kv)
    expected = [int(layer_key(i)) for i in range(len(indices))]
    if not indices or indices != expected:
        raise FaceIDFileError(f"{source}: cross-attention layers numbered {indices[:6]}...; IP-Adapter numbers them "
                              "1, 3, 5, ... (every second attention processor)")
    hidden_sizes = []
    for index in indices:
        pair = kv[index]
        if set(pair) != {"to_k_ip", "to_v_ip"}:
            raise FaceIDFileError(f"{source}: layer {index} lacks to_k_ip or to_v_ip")
        k, v = pair["to_k_ip"], pair["to_v_ip"]
        if k.ndim != 2 or k.shape != v.shape or int(k.shape[1]) != ctx:
            raise FaceIDFileError(f"{source}: layer {index} to_k_ip {tuple(k.shape)} / to_v_ip {tuple(v.shape)} do "
                                  f"not fit context dim {ctx}")
        hidden_sizes.append(int(k.shape[0]))
    config = AdapterConfig(context_dim=ctx, hidden_sizes=tuple(hidden_sizes), face_embed_dim=in_dim,
                           face_tokens=tokens, proj_mult=hidden // in_dim, body_branch=False)
    return config, lora


def copy_faceid_face_branch(adapter: BoLIDAdapter, parts: Mapping[str, Mapping[str, torch.Tensor]],
                            source: str) -> int:
    """Copy a FaceID state dict into ``adapter``'s face branch (projection and every layer's K/V).

    The adapter's face layout (context dim, layer sizes, token count, MLP width) must equal the file's; the body
    branch, if any, is left untouched. Returns the number of LoRA keys that were ignored.
    """
    config, lora = faceid_config(parts, source)
    mine = adapter.config
    theirs_face = (config.context_dim, config.hidden_sizes, config.face_embed_dim, config.face_tokens, config.proj_mult)
    mine_face = (mine.context_dim, mine.hidden_sizes, mine.face_embed_dim, mine.face_tokens, mine.proj_mult)
    if theirs_face != mine_face:
        raise FaceIDFileError(
            f"{source}: the FaceID face branch is {config.describe()} with {config.face_tokens} tokens, MLP x"
            f"{config.proj_mult}; the adapter is {mine.describe()} with {mine.face_tokens} tokens, MLP x"
            f"{mine.proj_mult} (use the FaceID file of the base model's family and face_tokens = {config.face_tokens})")
    proj = parts["image_proj"]
    with torch.no_grad():
        adapter.face_proj.load_state_dict({k: proj[k] for k in adapter.face_proj.state_dict()}, strict=True)
        for i in range(mine.num_layers):
            to_k, to_v = adapter.layer(i).projections("face")
            to_k.weight.copy_(parts["ip_adapter"][f"{layer_key(i)}.to_k_ip.weight"])
            to_v.weight.copy_(parts["ip_adapter"][f"{layer_key(i)}.to_v_ip.weight"])
    return len(lora)


def import_faceid(path: str | os.PathLike) -> FaceIDImport:
    """A face-only BoLID adapter holding a FaceID file's projection and K/V weights (float32)."""
    source = str(path)
    parts = read_ip_adapter_file(path)
    config, lora = faceid_config(parts, source)
    adapter = BoLIDAdapter(config)
    ignored = copy_faceid_face_branch(adapter, parts, source)
    for name, tensor in adapter.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise FaceIDFileError(f"{source}: tensor {name} contains NaN or Inf values; the file is damaged")
    if ignored:
        logger.info("BoLID: ignored the %d LoRA weights in %s; %s", ignored, Path(source).name, LORA_NOTE)
    return FaceIDImport(adapter.float().requires_grad_(False).eval(), ignored, Path(source).name)


def write_faceid_adapter(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Import ``path`` and write the BoLID adapter to ``out`` (a file, or a folder: ``<stem>.safetensors``)."""
    result = import_faceid(path)
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        out = out / f"bolid_{Path(path).stem}.safetensors"
    save_adapter(result.adapter, out, {FACEID_SOURCE_KEY: result.source,
                                       "bolid_faceid_lora_keys_ignored": str(result.lora_keys_ignored)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bolid.faceid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="write a face-only BoLID adapter from an IP-Adapter FaceID file")
    imp.add_argument("file", help="ip-adapter-faceid_sd15.bin, ip-adapter-faceid_sdxl.bin or a .safetensors version")
    imp.add_argument("--out", required=True, help="output .safetensors file or folder (e.g. ComfyUI/models/bolid)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = write_faceid_adapter(args.file, args.out)
    except FaceIDFileError as exc:
        logger.error("%s", exc)
        return 2
    config = read_adapter_config(written)
    logger.info("wrote %s (%s, %d face tokens); %s", written, config.describe(), config.face_tokens, LORA_NOTE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
