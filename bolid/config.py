"""The adapter's configuration: what a file must declare before any tensor is read."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import AdapterFileError
from .file_kinds import ADAPTER, check_file_kind

FORMAT_VERSION = 1

# (number of cross-attention layers, context dim) -> family name, for messages and checks
KNOWN_LAYOUTS: dict[tuple[int, int], str] = {(16, 768): "SD1.5", (70, 2048): "SDXL"}


def family_name(num_layers: int, context_dim: int) -> str:
    return KNOWN_LAYOUTS.get((num_layers, context_dim), "custom")


def describe_layout(num_layers: int, context_dim: int) -> str:
    return f"{family_name(num_layers, context_dim)} ({num_layers} layers, ctx {context_dim})"


@dataclass(frozen=True)
class AdapterConfig:
    """Dimensions of a BoLID adapter.

    ``body_branch=False`` is an adapter without body projection and body K/V (files written before this field
    existed hold both branches, which is the default). ``hidden_sizes`` lists the inner dim of every cross-attention layer in diffusers order (down blocks, up
    blocks, mid block), which is also the IP-Adapter key order 1, 3, 5, ...
    """

    context_dim: int
    hidden_sizes: tuple[int, ...]
    face_embed_dim: int = 512
    face_tokens: int = 4
    body_dim: int = 128
    body_tokens: int = 4
    proj_mult: int = 2
    body_branch: bool = True  # False: face branch only (an IP-Adapter FaceID import), body added by stage 2
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        for name in ("context_dim", "face_embed_dim", "face_tokens", "body_dim", "body_tokens", "proj_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AdapterConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.body_branch, bool):
            raise ValueError(f"AdapterConfig.body_branch must be true or false, got {self.body_branch!r}")
        if not self.hidden_sizes:
            raise ValueError("AdapterConfig.hidden_sizes is empty: the adapter needs at least one layer")

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def family(self) -> str:
        return family_name(self.num_layers, self.context_dim)

    def describe(self) -> str:
        return describe_layout(self.num_layers, self.context_dim) + ("" if self.body_branch else " (face branch only)")

    def to_metadata(self) -> dict[str, str]:
        return {"bolid_kind": ADAPTER, "bolid_format_version": str(self.format_version),
                "bolid_family": self.family, "bolid_config": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> AdapterConfig:
        check_file_kind(metadata, source, ADAPTER, (FORMAT_VERSION,), AdapterFileError)
        try:
            raw = json.loads(metadata["bolid_config"])
            return cls(**{**raw, "hidden_sizes": tuple(raw["hidden_sizes"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFileError(f"{source}: invalid bolid_config metadata ({exc})") from exc
