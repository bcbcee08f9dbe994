"""Captions for training photos from a local captioning model (BLIP-2, or any image-text-to-text model that
transformers loads), run once in the stage-1 prepare step.

Stage 2 conditions every target photo on its caption. A photo without one would teach the adapter the scene and
the clothing, which belong to the text. So the prepare step can caption every photo that has no ``<stem>.txt``:

- the model loads from a local folder only (``local_files_only``; a missing folder or missing weights is an error
  naming the folder); batched, on the accelerator when there is one, with a progress bar;
- the prompt asks for clothing, pose and place, not for the person's looks; an optional word filter removes or
  replaces words in the model's captions (its effect is logged);
- raw captions are cached in ``<dataset cache_dir>/captions.json``, reused while the photo and the captioner
  (model files, prompt, generation settings) are unchanged; the word filter applies after the cache;
- a caption file the user wrote is never touched, and is used unless ``overwrite = true``. No file is written
  next to the photos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from bolid.dataset import DatasetConfig, list_identities, read_rgb
from bolid.errors import BoLIDError
from bolid.safetensors_io import atomic_write_text

logger = logging.getLogger("bolid")

CACHE_FILE = "captions.json"
CACHE_KIND = "bolid_captions"
CACHE_VERSION = 1
# chat models (their processor has a chat template) get an instruction
DEFAULT_INSTRUCTION = ("Describe the person's clothing, their pose and the place in one sentence. Do not describe "
                       "their face, hair, body shape, age or gender.")
# BLIP-2 (OPT and FLAN-T5 variants) answers questions in this format
DEFAULT_BLIP2_PROMPT = "Question: What is the person wearing, how are they posed, and where are they? Answer:"


class CaptionConfigError(BoLIDError):
    """The [captions] table is invalid."""


class CaptionModelError(BoLIDError):
    """The captioning model folder is missing, incomplete or holds no image-to-text model."""


@dataclass(frozen=True)
class CaptionConfig:
    """The ``[captions]`` table of a stage-1 config.

    model: local transformers folder (config.json, *.safetensors, processor/tokenizer files). prompt: ``None`` =
    the default for the model (a question for BLIP-2, an instruction for chat models, none for other models);
    ``""`` = no prompt. overwrite: use the model's caption even where a caption file exists (the file itself is
    never changed). drop_words / replace_words: the word filter for the model's captions (whole words or phrases,
    case-insensitive). device: "auto" (CUDA, then Apple MPS, else CPU) or a torch device; dtype: "auto" (float16
    on CUDA, float32 elsewhere), "float32", "float16" or "bfloat16".
    """

    model: str
    prompt: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 40
    num_beams: int = 1
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    drop_words: tuple[str, ...] = ()
    replace_words: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise CaptionConfigError("[captions] model must name a local captioning model folder")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise CaptionConfigError("[captions] batch_size, max_new_tokens and num_beams must be >= 1")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise CaptionConfigError(f"[captions] dtype must be auto/float32/float16/bfloat16, got {self.dtype!r}")
        words = [*self.drop_words, *self.replace_words]
        if not all(isinstance(w, str) and w.strip() for w in words):
            raise CaptionConfigError("[captions] drop_words / replace_words hold non-empty words or phrases")
        if not all(isinstance(v, str) for v in self.replace_words.values()):
            raise CaptionConfigError("[captions] replace_words maps words to replacement strings")


def caption_config_from_dict(raw: dict[str, Any], base_dir: str | os.PathLike = ".") -> CaptionConfig:
    """Build a CaptionConfig from the TOML ``[captions]`` table; a relative ``model`` is relative to ``base_dir``."""
    raw = dict(raw)
    known = set(CaptionConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CaptionConfigError(f"[captions] has unknown keys {unknown}; known keys: {sorted(known)}")
    if not raw.get("model"):
        raise CaptionConfigError("[captions] needs model = <local captioning model folder>")
    raw["model"] = str((Path(base_dir) / raw["model"]).resolve())
    raw["drop_words"] = tuple(raw.get("drop_words", ()))
    raw["replace_words"] = dict(raw.get("replace_words", {}))
    try:
        return CaptionConfig(**raw)
    except TypeError as exc:
        raise CaptionConfigError(f"[captions]: {exc}") from exc


# ----------------------------------------------------------------------------------------------- word filter


class WordFilter:
    """Removes or replaces whole words/phrases (case-insensitive) and tidies the spaces and commas left behind.
    Longer phrases go first, so "young man" is matched before "man"."""

    def __init__(self, drop: Sequence[str] = (), replace: dict[str, str] | None = None) -> None:
        table = {w.strip(): "" for w in drop}
        table.update({w.strip(): r.strip() for w, r in (replace or {}).items()})
        self.rules = [(w, re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE), r)
                      for w, r in sorted(table.items(), key=lambda kv: -len(kv[0]))]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, text: str) -> tuple[str, Counter]:
        """(filtered text, number of matches per rule word)."""
        hits: Counter = Counter()
        for word, pattern, repl in self.rules:
            text, n = pattern.subn(repl, text)
            if n:
                hits[word] += n
        if hits:
            text = re.sub(r"\s+", " ", text)
            text = re.sub(r"\s+([,.;:!?])", r"\1", text)
            text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
            text = text.strip(" ,;:")
        return text, hits


# ----------------------------------------------------------------------------------------------- the model


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, then Apple MPS, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_folder(folder: Path) -> None:
    where = "([captions] model / --caption-model)"
    if not folder.is_dir():
        raise CaptionModelError(f"captioning model folder {folder} {where} does not exist: put a local transformers "
                                "model there (config.json, *.safetensors weights, processor and tokenizer files, e.g. "
                                "a BLIP-2 folder saved with save_pretrained); nothing is downloaded")
    if not (folder / "config.json").is_file():
        raise CaptionModelError(f"captioning model folder {folder} has no config.json: it must be a transformers "
                                "model folder (save_pretrained layout)")
    if not any(folder.glob("*.safetensors")):
        raise CaptionModelError(f"captioning model folder {folder} has no *.safetensors weights (missing weights; "
                                "pickled .bin weights are not loaded): copy the model's safetensors files there")


def captioner_fingerprint(config: CaptionConfig) -> str:
    """What the captions depend on: the model folder's files (name, size, mtime; hidden ones not), prompt and
    generation settings. The word filter is not part of it (it applies to cached captions)."""
    folder = Path(config.model)
    _check_folder(folder)
    h = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION, "max_new_tokens": config.max_new_tokens, "num_beams": config.num_beams,
        "prompt": config.prompt if config.prompt is not None else ["default", DEFAULT_INSTRUCTION,
                                                                   DEFAULT_BLIP2_PROMPT]}, sort_keys=True).encode())
    # hidden entries (.git, huggingface-cli's .cache) are not the model
    for p in sorted(q for q in folder.rglob("*")
                    if q.is_file() and not any(part.startswith(".") for part in q.relative_to(folder).parts)):
        st = p.stat()
        h.update(f"{p.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class Captioner:
    """A loaded captioning model: ``captioner(images) -> captions`` for a batch of PIL images."""

    def __init__(self, model: Any, processor: Any, prompt: str, chat: bool, device: torch.device,
                 dtype: torch.dtype, max_new_tokens: int, num_beams: int) -> None:
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self.prompt = prompt
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        self.text: str | None = None
        if chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self.text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        elif prompt:
            self.text = prompt
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only models continue the prompt's last token

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.text is not None:
            kwargs.update(text=[self.text] * len(images), padding=True)
        inputs = self.processor(**kwargs)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                  do_sample=False)
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]  # decoder-only models return the prompt too
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_clean(t, self.prompt) for t in texts]


def _clean(text: str, prompt: str) -> str:
    text = " ".join(text.split())
    if prompt and text.startswith(prompt):
        text = text[len(prompt):]
    return text.strip()


def load_captioner(config: CaptionConfig) -> Captioner:
    """Load the model and processor from ``config.model`` with ``local_files_only`` (never downloads).

    BLIP-2 folders load as Blip2ForConditionalGeneration + Blip2Processor; any other model type that transformers'
    image-text-to-text auto class knows loads through AutoModelForImageTextToText + AutoProcessor. Models that need
    their own code (trust_remote_code) are not loaded.
    """
    folder = Path(config.model)
    _check_folder(folder)
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        Blip2Processor,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    device = resolve_device(config.device)
    if config.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    try:
        model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CaptionModelError(f"captioning model folder {folder}: config.json cannot be read by transformers "
                                f"({type(exc).__name__}: {exc})") from exc
    kind = model_config.model_type
    if kind == "blip-2":
        model_cls, processor_cls = Blip2ForConditionalGeneration, Blip2Processor
    elif kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        model_cls, processor_cls = AutoModelForImageTextToText, AutoProcessor
    else:
        raise CaptionModelError(f"captioning model folder {folder} holds a {kind!r} model, which is not an "
                                "image-text-to-text model transformers knows (BLIP-2, BLIP, LLaVA, Qwen2-VL, ... "
                                "are); use one of those")
    try:
        processor = processor_cls.from_pretrained(folder, local_files_only=True)
        model = model_cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaptionModelError(f"captioning model folder {folder}: the {kind} model or its processor cannot be "
                                f"loaded from the local files ({type(exc).__name__}: {exc}); the folder needs the "
                                "weights, config.json and the processor/tokenizer files") from exc
    model.to(device).eval()
    chat = bool(getattr(processor, "chat_template", None))
    if config.prompt is not None:
        prompt = config.prompt
    else:
        prompt = DEFAULT_INSTRUCTION if chat else DEFAULT_BLIP2_PROMPT if kind == "blip-2" else ""
    if chat and not prompt:
        raise CaptionConfigError(f"[captions] prompt is empty, but {folder} is a chat model that needs an instruction")
    logger.info("BoLID captions: %s model from %s on %s (%s), prompt %r", kind, folder, device,
                str(dtype).removeprefix("torch."), prompt)
    return Captioner(model, processor, prompt, chat, device, dtype, config.max_new_tokens, config.num_beams)


# ----------------------------------------------------------------------------------------------- the dataset


@dataclass
class CaptionResult:
    """The model captions to use (photo path -> filtered caption) and what the captioning step did."""

    captions: dict[str, str]
    kept_files: int = 0  # photos whose caption file is used
    generated: int = 0  # captioned by the model in this run
    reused: int = 0  # model captions taken from the cache
    filtered: int = 0  # model captions the word filter changed


def _photo_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}|{st.st_mtime_ns}"


def _read_cache(path: Path, fingerprint: str) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("BoLID captions: %s is unreadable (%s); captioning again", path, exc)
        return {}
    if record.get("bolid_kind") != CACHE_KIND or record.get("captioner") != fingerprint:
        logger.info("BoLID captions: the captioner changed since %s was written (model files, prompt or "
                    "generation settings); captioning again", path)
        return {}
    return dict(record.get("photos", {}))


def _write_cache(path: Path, fingerprint: str, config: CaptionConfig, photos: dict[str, dict[str, str]]) -> None:
    atomic_write_text(path, json.dumps({"bolid_kind": CACHE_KIND, "version": CACHE_VERSION, "captioner": fingerprint,
                                        "model": config.model, "prompt": config.prompt, "photos": photos},
                                       indent=1, ensure_ascii=False))


def _needs_caption(path: Path, min_res: int) -> bool:
    """False for photos the prepare step skips anyway (unreadable, too small); it reports them."""
    try:
        with Image.open(path) as im:
            return min(im.size) >= min_res
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def caption_dataset(dataset: DatasetConfig, config: CaptionConfig,
                    load: Callable[[CaptionConfig], Captioner] | None = None) -> CaptionResult:
    """Model captions for the dataset's photos that need one (no caption file, or all with ``overwrite``).

    Cached raw captions are reused while the photo and the captioner are unchanged; the model is loaded only when
    some photo has no valid cached caption. Returns filtered captions keyed by ``str(photo path)``, as
    :func:`bolid.dataset_prepare.prepare_dataset` takes them.
    """
    fingerprint = captioner_fingerprint(config)
    cache_path = Path(dataset.cache_dir) / CACHE_FILE
    Path(dataset.cache_dir).mkdir(parents=True, exist_ok=True)
    cached = _read_cache(cache_path, fingerprint)
    result = CaptionResult(captions={})
    todo: list[tuple[Path, str]] = []
    entries: dict[str, dict[str, str]] = {}
    raw: dict[str, str] = {}
    for _, _, subset, images in list_identities(dataset):
        ext = subset.caption_extension or dataset.caption_extension
        min_res = subset.min_resolution or dataset.min_resolution
        for path in images:
            key = str(path)
            stamp = _photo_stamp(path)
            hit = cached.get(key)
            if hit is not None and hit.get("stamp") == stamp:
                entries[key] = hit  # kept while valid, also for photos that now have a caption file
            if path.with_suffix(ext).is_file() and not config.overwrite:
                result.kept_files += 1
                continue
            if key in entries:
                raw[key] = entries[key]["caption"]
                result.reused += 1
            elif _needs_caption(path, min_res):
                todo.append((path, stamp))
    if todo:
        _generate(todo, config, load or load_captioner, entries, raw, result, cache_path, fingerprint)
    elif set(entries) != set(cached) or not cache_path.is_file():
        _write_cache(cache_path, fingerprint, config, entries)
    word_filter = WordFilter(config.drop_words, config.replace_words)
    hits: Counter = Counter()
    for key, text in raw.items():
        if word_filter:
            filtered, n = word_filter(text)
            if n:
                hits.update(n)
                result.filtered += 1
            text = filtered
        result.captions[key] = text
    if word_filter:
        logger.info("BoLID captions: the word filter changed %d of %d model captions (%s)", result.filtered,
                    len(raw), ", ".join(f"{w!r} x{n}" for w, n in hits.most_common()) or "no word matched")
    empty = sum(1 for t in result.captions.values() if not t)
    if empty:
        logger.warning("BoLID captions: %d model caption(s) are empty (after the word filter); those photos train "
                       "with the empty prompt", empty)
    logger.info("BoLID captions: %d photos keep their caption files, %d model captions (%d new, %d from %s)",
                result.kept_files, len(raw), result.generated, result.reused, cache_path)
    return result


def _generate(todo: list[tuple[Path, str]], config: CaptionConfig, load: Callable[[CaptionConfig], Captioner],
              entries: dict[str, dict[str, str]], raw: dict[str, str], result: CaptionResult, cache_path: Path,
              fingerprint: str) -> None:
    from tqdm.auto import tqdm

    captioner = load(config)
    last_save = time.monotonic()
    try:
        with tqdm(total=len(todo), desc="BoLID captions", unit="photo") as bar:
            for start in range(0, len(todo), config.batch_size):
                batch, images = [], []
                for path, stamp in todo[start:start + config.batch_size]:
                    try:
                        images.append(Image.fromarray(read_rgb(path)))
                        batch.append((path, stamp))
                    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
                        pass  # a damaged photo: the prepare step skips and reports it
                for (path, stamp), text in zip(batch, captioner(images) if images else [], strict=True):
                    entries[str(path)] = {"stamp": stamp, "caption": text}
                    raw[str(path)] = text
                    result.generated += 1
                bar.update(min(config.batch_size, len(todo) - start))
                if time.monotonic() - last_save > 60:  # a killed long run keeps most of what it captioned
                    _write_cache(cache_path, fingerprint, config, entries)
                    last_save = time.monotonic()
    finally:
        _write_cache(cache_path, fingerprint, config, entries)  # also what an interrupted run captioned
        del captioner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
