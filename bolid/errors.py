"""Exceptions that carry a specific, user-facing message, and the net that keeps foreign ones out of loaders."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class BoLIDError(Exception):
    """Base class: the message says what is wrong and what to do."""


class AdapterFileError(BoLIDError):
    """An adapter file cannot be read or does not hold a valid BoLID adapter."""


class AdapterMismatchError(BoLIDError):
    """The adapter does not fit the model it is applied to."""


class EmbeddingError(BoLIDError):
    """A face embedding or body identity is unusable (wrong size, NaN, ...)."""


@contextlib.contextmanager
def reading(path: str | os.PathLike, error_cls: type[BoLIDError], what: str = "file") -> Iterator[None]:
    """Turn any non-BoLID exception raised while a file is read into ``error_cls`` naming the file.

    Loaders check what they know to check with specific messages; this is the net for whatever content a
    damaged or crafted file holds, so no torch/JSON/safetensors/onnxruntime exception type leaks out of a loader.
    """
    try:
        yield
    except BoLIDError:
        raise
    except Exception as exc:  # the point is to catch whatever a foreign file provokes
        raise error_cls(f"{path}: cannot be read as a {what} ({type(exc).__name__}: {exc}); the file is damaged "
                        "or not what its name says: re-download or re-export it") from exc


class UnsupportedModelError(BoLIDError):
    """The model is not a UNet family BoLID patches (SD1.5 / SDXL cross-attention layout)."""


class MaskError(BoLIDError):
    """An attention mask input has a shape or values BoLID cannot apply."""
