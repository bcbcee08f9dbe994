"""The stage-2 adapters on both cores: one worker process beside the main one, one torch thread each.

Why: at 32 px with a batch of 16 the UNet's operators are too small for two intra-op threads to keep two cores
busy (one adapter trains at about 2.5 steps/s with 2 threads, two adapters at about 2 steps/s each with 1 thread
apiece). So the experiment trains adapters side by side instead: the oracle adapter, which needs no Body-ID
encoder, trains in the worker while the main process trains stage 1; then the adapters that read c_body are
split between the main process and the worker.

Every adapter and stage 1 run with exactly one torch thread whatever the schedule, so the results do not depend
on which process trained what or in which order: the run stays deterministic. ``workers = 0`` in the config
trains everything in the main process, in order, with ``threads`` threads (the schedule before this module).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

logger = logging.getLogger("bolid.experiment")

# (adapter, per-step losses, seconds) of one recipe
Trained = tuple[Any, list[dict], float]


def _start_worker(level: int) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s [worker] %(message)s")


def timed(train: Callable[..., tuple[Any, list[dict]]], *args: Any, **kwargs: Any) -> Trained:
    """``train(*args, **kwargs)`` and the seconds it took (runs in whichever process calls it)."""
    t0 = time.time()
    adapter, losses = train(*args, **kwargs)
    return adapter, losses, round(time.time() - t0, 1)


def _run(payload: bytes) -> bytes:
    train, args, kwargs = pickle.loads(payload)
    return pickle.dumps(timed(train, *args, **kwargs))


class AdapterWorkers:
    """A pool of ``workers`` spawned processes (1 torch thread each) for stage-2 training jobs.

    ``submit`` pickles the job at once (the caller may go on to train on the same UNet, which attaches the adapter
    to it) and returns a future of the trained result. Plain pickle both ways: the world's models, the training
    identities and the adapter are a few tens of MB, and thousands of small tensors would otherwise each hold a
    shared-memory file descriptor. Use as a context manager: leaving it waits for the pool and shuts it down, also
    when the caller fails."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"AdapterWorkers needs at least one worker, got {workers}")
        context = multiprocessing.get_context("spawn")  # a fork of a process that ran OpenMP threads can hang
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                                        initargs=(logging.getLogger().getEffectiveLevel(),))

    def submit(self, train: Callable[..., tuple[Any, list[dict]]], *args: Any, **kwargs: Any) -> Future[bytes]:
        return self.pool.submit(_run, pickle.dumps((train, args, kwargs)))

    @staticmethod
    def result(future: Future[bytes]) -> Trained:
        return pickle.loads(future.result())

    def __enter__(self) -> AdapterWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
