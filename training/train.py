"""BoLID training entry: ``accelerate launch training/train.py --config <config.toml> [--resume latest]``.

The config's top-level ``stage`` picks the stage module (``STAGES``). Each stage module exposes
``run(raw_config: dict, config_dir: Path, resume: str | None, prepare_only: bool) -> dict``; adding a stage is one
line in ``STAGES``. Works as ``python training/train.py`` too (one process, CPU or one GPU).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `accelerate launch training/train.py` puts training/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from bolid.errors import BoLIDError  # noqa: E402

# stage number -> module with run(raw_config, config_dir, resume, prepare_only)
STAGES: dict[int, str] = {
    1: "training.stage1",
    2: "training.stage2",
}

logger = logging.getLogger("bolid")


def load_config(path: str | Path) -> dict[str, Any]:
    """Parse a TOML training config; the error names the file and the TOML problem."""
    path = Path(path)
    if not path.is_file():
        raise BoLIDError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise BoLIDError(f"{path}: invalid TOML ({exc})") from exc


def stage_module(raw: dict[str, Any], source: str) -> Any:
    stage = raw.get("stage")
    if stage not in STAGES:
        raise BoLIDError(f"{source}: 'stage' must be one of {sorted(STAGES)} at the top of the config, got {stage!r}")
    return importlib.import_module(STAGES[stage])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="BoLID training (stage chosen by the config's `stage` key)")
    parser.add_argument("--config", required=True, help="TOML config (see training/configs/)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--prepare-only", action="store_true", help="only build the dataset cache, then exit")
    parser.add_argument("--caption-model", default=None, metavar="FOLDER",
                        help="stage 1: caption photos without a caption file with this local model folder "
                             "(BLIP-2 or another transformers image-text-to-text model); sets [captions] model")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    level = logging.getLevelName(args.log_level.upper())
    if int(os.environ.get("RANK", "0")) != 0 and isinstance(level, int):
        # several processes (accelerate launch / torchrun set RANK): only the first one logs progress; the others
        # still log warnings and errors, which can be their own
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config_path = Path(args.config).resolve()
    try:
        raw = load_config(config_path)
        if args.caption_model:
            if raw.get("stage") != 1:
                raise BoLIDError("--caption-model: captions are made by the stage-1 prepare step (stage 2 reads them "
                                 "from the stage-1 cache); run it with the stage-1 config")
            captions = raw.setdefault("captions", {})
            if not isinstance(captions, dict):
                raise BoLIDError(f"{config_path}: 'captions' must be a table ([captions])")
            captions["model"] = str(Path(args.caption_model).resolve())  # relative to the working directory
        result = stage_module(raw, str(config_path)).run(raw, config_path.parent, resume=args.resume,
                                                         prepare_only=args.prepare_only)
    except BoLIDError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("done: %s", {k: v for k, v in result.items() if k != "losses"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
