"""onnxruntime execution-provider choice shared by the pose and face runners.

Users of other packs complain that onnxruntime-gpu silently falls back to the CPU. Here a provider is chosen
explicitly ("auto" picks the best one this onnxruntime build offers), an explicit choice that the build lacks
is an error naming what is available, and the provider that actually runs is logged from the live session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .errors import BoLIDError

logger = logging.getLogger("bolid")

CPU = "CPUExecutionProvider"

# user-facing name -> onnxruntime provider names, in order of preference
PROVIDER_ALIASES: dict[str, tuple[str, ...]] = {
    "CUDA": ("CUDAExecutionProvider",),
    "ROCm": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
    "CoreML": ("CoreMLExecutionProvider",),
    "DirectML": ("DmlExecutionProvider",),
    "CPU": (CPU,),
}
PROVIDER_CHOICES: tuple[str, ...] = ("auto", *PROVIDER_ALIASES)
# "auto" tries these in order; TensorRT is left out on purpose (its first run builds engines for minutes).
_AUTO_ORDER: tuple[str, ...] = ("CUDA", "ROCm", "DirectML", "CoreML", "CPU")


class ProviderError(BoLIDError):
    """The requested onnxruntime execution provider is not available in this onnxruntime build."""


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def resolve_providers(choice: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime provider list for a user choice ("auto", "CUDA", "ROCm", "CoreML", "DirectML", "CPU").

    The chosen provider comes first and the CPU provider last as the fallback for operators it lacks.
    """
    available = list(available) if available is not None else available_providers()
    if choice not in PROVIDER_ALIASES and choice != "auto":
        raise ProviderError(f"unknown execution provider {choice!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    names = _AUTO_ORDER if choice == "auto" else (choice,)
    for name in names:
        for provider in PROVIDER_ALIASES[name]:
            if provider in available:
                return [provider] if provider == CPU else [provider, CPU]
    if choice == "auto":
        raise ProviderError(f"onnxruntime reports no usable execution provider (available: {available})")
    hint = {
        "CUDA": "install onnxruntime-gpu (and not the plain onnxruntime package, they overwrite each other)",
        "ROCm": "install an onnxruntime build with ROCm or MIGraphX support",
        "DirectML": "install onnxruntime-directml (Windows)",
        "CoreML": "use the macOS onnxruntime wheel",
    }.get(choice, "")
    raise ProviderError(f"execution provider {choice!r} is not available in this onnxruntime build "
                        f"(available: {', '.join(available)}); {hint or 'choose another provider'}, or choose 'auto'")


def create_session(path: str, choice: str = "auto", what: str = "model"):
    """An onnxruntime InferenceSession on the chosen provider; logs (and warns about) the provider that runs."""
    import onnxruntime

    providers = resolve_providers(choice)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, sess_options=options, providers=providers)
    check_active_provider(session.get_providers(), providers, what)
    return session


def check_active_provider(active: Sequence[str], requested: Sequence[str], what: str) -> str:
    """Log the provider that runs; warn when onnxruntime dropped the requested one (the silent CPU fallback)."""
    running = active[0] if active else "none"
    if requested and running != requested[0]:
        logger.warning("BoLID: %s runs on %s although %s was requested: onnxruntime could not start the requested "
                       "provider (missing CUDA/cuDNN libraries?)", what, running, requested[0])
    else:
        logger.info("BoLID: %s runs on %s", what, running)
    return running
