"""The stage-2 adapters on both cores: worker processes beside the main one, one torch thread each.

Why: at 32 px with a batch of 16 the UNet's operators are too small for two intra-op threads to keep two cores
busy, so two adapters at one thread each finish sooner side by side than one after the other at two threads
(README "Experiment (CPU)", run time). So the experiment trains adapters side by side: the oracle adapter, which needs no Body-ID
encoder, trains in the worker while the main process trains stage 1; then the adapters that read c_body are
split between the main process and the worker.

In this schedule stage 1 and every adapter run with exactly one torch thread, so the results do not depend on
which process trained what or in which order: the run stays deterministic, and it equals the in-process schedule
(``workers = 0``, everything in order in the main process with ``threads`` threads) run with ``threads = 1``
(tests/test_experiment_smoke.py). That equality also needs training an adapter to leave no state on the UNet it
attaches to (the worker trains on a copy taken before the main process trains any), which
``training.stage2_loop`` guarantees by detaching the adapter when it is done.
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

    @staticmethod
    def raise_failed(futures: list[Future[bytes]]) -> None:
        """Raise a finished job's error now, before the caller spends minutes on work that will be thrown away."""
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.pool.shutdown(wait=True)
            return
        # the caller failed: a running job would otherwise hold a core (and the caller's error) until it ends
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)
