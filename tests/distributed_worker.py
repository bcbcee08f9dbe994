"""One process of a multi-process training test: ``accelerate launch ... tests/distributed_worker.py <record dir>
<watched dir> -- <training/train.py arguments>``.

It runs the real entry point (``training.train.main``) and records, per process, what the tests cannot see from
outside: every file the process creates, writes, renames or removes under the watched folder (Python's audit
events, plus safetensors' and torch's writers, which write from Rust and C++), the INFO records of the ``bolid`` logger it emitted,
and the trained parameters at ``end_training``. The record is ``<record dir>/rank<N>.json`` and
``rank<N>.params.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

RECORD_DIR = Path(sys.argv[1]).resolve()
WATCHED = Path(sys.argv[2]).resolve()
TRAIN_ARGS = sys.argv[sys.argv.index("--") + 1:]
RANK = int(os.environ.get("RANK", "0"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

_events: list[tuple[str, str]] = []
_lock = threading.Lock()


def _note(kind: str, path: object) -> None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return  # a file descriptor
    full = Path(os.path.abspath(path))
    if full == WATCHED or WATCHED in full.parents:
        with _lock:
            _events.append((kind, str(full.relative_to(WATCHED))))


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (isinstance(flags, int)
                                                                                   and flags & WRITE_FLAGS)
        if writing:
            _note("write", path)
    elif event == "os.rename":
        _note("write", args[1])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        _note(event, args[0])


sys.addaudithook(_audit)

import safetensors.torch  # noqa: E402  (wrapped before accelerate or bolid bind its writer)

_save_file = safetensors.torch.save_file


def _recorded_save_file(tensors, filename, *args, **kwargs):
    _note("write", filename)
    return _save_file(tensors, filename, *args, **kwargs)


safetensors.torch.save_file = _recorded_save_file

import logging  # noqa: E402

import torch  # noqa: E402

_torch_save = torch.save


def _recorded_torch_save(obj, f, *args, **kwargs):  # writes from C++ when given a path
    _note("write", f)
    return _torch_save(obj, f, *args, **kwargs)


torch.save = _recorded_torch_save
from accelerate import Accelerator  # noqa: E402

_info_lines: list[str] = []


class _InfoRecorder(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            _info_lines.append(record.getMessage())


logging.getLogger("bolid").addHandler(_InfoRecorder())
_end_training = Accelerator.end_training


def _end_training_and_record(self: Accelerator) -> None:
    params = {}
    for i, model in enumerate(self._models):
        for name, p in self.unwrap_model(model).named_parameters():
            if p.requires_grad:
                params[f"{i}.{name}"] = p.detach().cpu().clone()
    torch.save(params, RECORD_DIR / f"rank{RANK}.params.pt")
    _end_training(self)


Accelerator.end_training = _end_training_and_record

if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from training.train import main

    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    code = main(TRAIN_ARGS)
    (RECORD_DIR / f"rank{RANK}.json").write_text(json.dumps({"rank": RANK, "exit": code, "events": _events,
                                                             "info": _info_lines}))
    sys.exit(code)
