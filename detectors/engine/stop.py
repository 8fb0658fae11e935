"""Stopping a training run on SIGTERM or SIGINT without losing its work.

A cluster that preempts a job sends SIGTERM and kills it some seconds later; Ctrl-C sends SIGINT. Either one, the
first time, asks the loop to stop after the iteration it is in: it then writes a checkpoint and raises
`TrainingInterrupted`, and ``--resume`` continues with the same results as an uninterrupted run. A second signal
acts as it would have without this (SIGINT raises KeyboardInterrupt at once, SIGTERM terminates).
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

from .distributed import is_distributed

__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

logger = logging.getLogger("detectors.train")


class TrainingInterrupted(Exception):
    """Training stopped on a signal after ``iteration`` iterations; ``checkpoint`` holds them."""

    def __init__(self, iteration: int, signum: int, checkpoint):
        self.iteration, self.signum, self.checkpoint = iteration, signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; "
                         f"checkpoint {checkpoint}: continue with --resume")


class StopSignals:
    """Context manager: within it, the first SIGINT/SIGTERM is recorded instead of acted on.

    Handlers are installed only in the main thread (Python delivers signals there), not for a signal the process
    ignores, and restored on exit.
    ``requested(device)`` tells whether to stop; in a distributed run it is a collective, so every process
    must call it at the same point and all of them get the same answer.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # An ignored signal stays ignored: a job started in the background or under a launcher that ignores
            # SIGINT must not start obeying it.
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS
                              if signal.getsignal(signum) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("%s: stopping after this iteration with a checkpoint (send it again to stop at once)",
                       signal.Signals(signum).name)

    def requested(self, device: torch.device) -> int | None:
        """The signal to stop on, or None: this process's, or in a distributed run the largest number any
        process received (one answer for all of them)."""
        if not is_distributed():
            return self.signum
        value = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item()) or None
