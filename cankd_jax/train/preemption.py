"""Preemption: every process decides to save and stop at the same step, however many were signalled.

A scheduler usually sends SIGTERM to one host (or to each at a different time).
One process alone: a SIGTERM handler sets a flag that the loop reads after
each step. Several processes: JAX's preemption sync manager (started by
`jax.distributed.initialize`) catches SIGTERM on whichever process gets it and,
through the coordination service, makes `reached(step)` return True on every
process at the same step (the first step every process can still reach); the
others would otherwise step on into a collective that the stopped process never
joins. Its per-step cost is a local flag check; no collective runs until a notice
arrives.

Ctrl-C (SIGINT) is taken as a notice too: the first one saves at the end of the step and stops (in a
multi-process job it is passed on as SIGTERM, so every process stops at the same step); a second one stops at
once (KeyboardInterrupt), without saving. Left to Python's default, a Ctrl-C during compilation or a save gave a
traceback, could crash inside the asynchronous checkpoint writer, and left a half-written checkpoint behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preemption:
    """Context manager; `reached(step)` after each step says whether to save and stop now (same on every process)."""

    def __init__(self):
        self._flag = False
        self._previous = None
        self._previous_int = None
        self._multi = False

    def __enter__(self) -> Preemption:
        self._multi = jax.process_count() > 1
        # Signal handlers can only be installed from the main thread (not e.g. a notebook's worker). One process:
        # our own SIGTERM handler. Several: JAX's sync manager owns SIGTERM; a Python handler would take it away.
        if threading.current_thread() is threading.main_thread():
            if not self._multi:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not one a launcher set to ignore
                self._previous_int = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
        self._flag = True

    def _interrupt(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at "
                    "once, without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one interrupts
        os.kill(os.getpid(), signal.SIGTERM)  # the way a scheduler's notice comes: to our handler, or JAX's

    @property
    def requested(self) -> bool:
        """Whether this process alone has been told to stop (one-process runs; in a multi-process job the notice
        lives in JAX's sync manager, and `reached` reads it at the next step)."""
        return self._flag

    def reached(self, step: int) -> bool:
        if not self._multi:
            return self._flag
        try:
            reached = multihost_utils.reached_preemption_sync_point(int(step))
        except RuntimeError as e:  # the service is off (jax_enable_preemption_service=False)
            raise ValueError("a multi-process run needs JAX's preemption service to agree on preemption; "
                             f"leave jax_enable_preemption_service on ({e})") from None
        if reached:
            log.warning("preemption notice: every process saves a checkpoint at step %d, then stops", step)
        return reached

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
        return False
