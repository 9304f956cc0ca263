"""The one signal policy of a run.

- In the training loop, the first SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`) only asks
  it to stop: the loop writes ``last.pt`` at its next step and raises KeyboardInterrupt. A
  second signal stops at once (:class:`StopRequest`).
- Around the loop, SIGTERM ends the run like Ctrl-C: KeyboardInterrupt, run KILLED
  (:func:`sigterm_as_interrupt`).
- A job that spawned DDP workers passes both signals on to them, so they stop the same way
  (:func:`forwarded_to`).
Handlers can only be set in the main thread; elsewhere these leave signals as they are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _handled(handler: Callable, signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
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
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does."""
    return _handled(_interrupt, (signal.SIGTERM,))


@contextlib.contextmanager
def forwarded_to(processes: Sequence) -> Iterator[list[int]]:
    """Pass stop signals on to the live ``processes``; yields the list of signals received."""
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    with _handled(forward):
        yield received
