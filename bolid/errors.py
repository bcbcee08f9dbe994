"""Exceptions that carry a specific, user-facing message."""


class BoLIDError(Exception):
    """Base class: the message says what is wrong and what to do."""


class AdapterFileError(BoLIDError):
    """An adapter file cannot be read or does not hold a valid BoLID adapter."""


class AdapterMismatchError(BoLIDError):
    """The adapter does not fit the model it is applied to."""


class EmbeddingError(BoLIDError):
    """A face embedding or body identity is unusable (wrong size, NaN, ...)."""


class UnsupportedModelError(BoLIDError):
    """The model is not a UNet family BoLID patches (SD1.5 / SDXL cross-attention layout)."""


class MaskError(BoLIDError):
    """An attention mask input has a shape or values BoLID cannot apply."""
