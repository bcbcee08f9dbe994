"""BoLID's file kinds: one check of a file's kind and format version, one table of which loader reads which kind.

Every BoLID file is a safetensors file whose metadata names its kind (``bolid_kind``) and format version
(``bolid_format_version``). Loaders check both through :func:`read_file_kind` before reading any tensor, so a file
of another kind is refused with the same message everywhere, naming the node that does load it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BoLIDError
from .safetensors_io import read_safetensors_metadata

ADAPTER = "bolid_adapter"
BODY_ENCODER = "bolid_body_encoder"
BODY_ID = "bolid_body_id"
FACE_ID = "bolid_face_id"

# suffixes of pickle-based checkpoints: never unpickled, refused by name before the file is opened
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})


@dataclass(frozen=True)
class FileKind:
    """How messages name a kind (``what``), the node that loads it, and where such files come from."""

    what: str
    loader: str
    made_by: str


KINDS: dict[str, FileKind] = {
    ADAPTER: FileKind("BoLID adapter", "Load Adapter (BoLID)",
                      "BoLID adapters are .safetensors files written by BoLID's training or export"),
    BODY_ENCODER: FileKind("BoLID Body-ID encoder", "Load Body-ID Encoder (BoLID)",
                           "encoders are .safetensors files exported by BoLID's stage-1 training"),
    BODY_ID: FileKind("BoLID body ID", "Load Body ID (BoLID)", "save identities with the Save Body ID node"),
    FACE_ID: FileKind("BoLID face ID", "Load Face ID (BoLID)", "save face identities with the Save Face ID node"),
}


@dataclass(frozen=True)
class FileInfo:
    """What a loader read besides the model: the file, its kind and version, and its metadata.

    ``content_hash`` is the hash of the loaded weights where the kind has one (Body-ID encoders: the hash that
    identities record), computed once by the loader.
    """

    path: Path
    kind: str
    format_version: int
    metadata: Mapping[str, str] = field(repr=False)
    content_hash: str = ""


def refuse_pickle(path: str | os.PathLike, kind: str, error_cls: type[BoLIDError]) -> None:
    """Refuse a pickle checkpoint by its name, before anything is read."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise error_cls(f"{path}: {KINDS[kind].what} files are .safetensors files only (pickle files are not "
                        "loaded)")


def check_file_kind(metadata: Mapping[str, str], source: str, kind: str, readable_versions: tuple[int, ...],
                    error_cls: type[BoLIDError]) -> int:
    """The kind and format version a file's metadata declares, checked; returns the version.

    A file of another BoLID kind gets the name of the node that loads it.
    """
    expected = KINDS[kind]
    found = metadata.get("bolid_kind")
    if found != kind:
        other = KINDS.get(found) if isinstance(found, str) else None
        hint = f": it is a {other.what}, load it with {other.loader}" if other is not None else ""
        raise error_cls(f"{source}: not a {expected.what} (metadata bolid_kind={found!r}){hint}; {expected.made_by}")
    try:
        version = int(metadata.get("bolid_format_version", ""))
    except ValueError as exc:
        raise error_cls(f"{source}: missing or invalid bolid_format_version") from exc
    if version not in readable_versions:
        readable = ", ".join(str(v) for v in readable_versions)
        raise error_cls(f"{source}: {expected.what} format version {version} is not supported (this BoLID reads "
                        f"{readable}); update the node pack or re-export the file")
    return version


def read_file_kind(path: str | os.PathLike, kind: str, readable_versions: tuple[int, ...],
                   error_cls: type[BoLIDError]) -> tuple[dict[str, str], int]:
    """(metadata, format version) of a BoLID file, after the name, the header, the kind and the version are
    checked; no tensor is read."""
    refuse_pickle(path, kind, error_cls)
    metadata = read_safetensors_metadata(path, error_cls)
    return metadata, check_file_kind(metadata, str(path), kind, readable_versions, error_cls)
