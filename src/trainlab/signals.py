"""The one signal policy of a run.

- In the training loop, the first SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`) only asks
  it to stop: the loop writes ``last.pt`` at its next step and raises KeyboardInterrupt. A
  second signal stops at once (:class:`StopRequest`).
- Around the loop, SIGTERM ends the run like Ctrl-C: KeyboardInterrupt, run KILLED
  (:func:`sigterm_as_interrupt`).
- A job that spawned DDP workers passes both signals on to them, so they stop the same way
  (:func:`forwarded_to`).
- Under a cluster scheduler (hydra_plugins/trainlab_submitit), the signal it sends before
  it preempts a job or its time limit ends stops a run the same way, and is noted so the
  job requeues itself (:func:`preemption`).
Handlers can only be set in the main thread; elsewhere these leave signals as they are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preemption:
    """The scheduler's warning signal while a job expects one, and whether it came."""

    def __init__(self, signum: int | None = None) -> None:
        self.signum = signum
        self.received = False


_preemption = Preemption()  # no scheduler signal expected


def _stop_signals() -> tuple[int, ...]:
    return STOP_SIGNALS + ((_preemption.signum,) if _preemption.signum else ())


@contextlib.contextmanager
def _handled(handler: Callable, signals: Sequence[int] | None = None) -> Iterator[None]:
    """``handler`` for ``signals`` (the stop signals) while entered; a preemption signal
    among them is noted first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def noting(signum: int, frame) -> None:
        if signum == _preemption.signum:
            _preemption.received = True
        handler(signum, frame)

    signals = _stop_signals() if signals is None else signals
    previous = {sig: signal.signal(sig, noting) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """While entered, a stop signal sets :attr:`signum` for the loop to act on."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._handled: contextlib.AbstractContextManager | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _note(self, signum: int, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        self._handled = _handled(self._note)
        self._handled.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handled.__exit__(*exc)


def _interrupt(_signum: int, _frame) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> contextlib.AbstractContextManager:
    """SIGTERM (and a scheduler's preemption signal) raises KeyboardInterrupt, as Ctrl-C
    does."""
    return _handled(_interrupt, tuple(s for s in _stop_signals() if s != signal.SIGINT))


@contextlib.contextmanager
def preemption(signum: int) -> Iterator[Preemption]:
    """While entered, ``signum`` (what Slurm sends before it preempts a job or its time limit
    ends) stops a run as SIGTERM does: in the loop at the next step with ``last.pt``,
    elsewhere at once; all by KeyboardInterrupt. The yielded record says whether it came."""
    global _preemption
    outer, _preemption = _preemption, Preemption(signum)
    try:
        with _handled(_interrupt, (signum,)):
            yield _preemption
    finally:
        _preemption = outer


@contextlib.contextmanager
def forwarded_to(processes: Sequence) -> Iterator[list[int]]:
    """Pass stop signals on to the live ``processes``; yields the list of signals received."""
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        for process in processes:  # workers know SIGINT and SIGTERM only
            if process.is_alive():
                os.kill(process.pid, signum if signum in STOP_SIGNALS else signal.SIGTERM)

    with _handled(forward):
        yield received
