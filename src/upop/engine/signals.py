"""SIGTERM / SIGINT: finish the current step, write a checkpoint, stop with a line that says how to resume.

Cluster schedulers send SIGTERM before they kill a job, and a user presses Ctrl-C. Either one only sets a flag here;
the loop looks at it after every step (every rank agrees through one all-reduce), so a checkpoint being written is
finished, never abandoned half-way, and the run stops at a step it can resume from exactly. A second signal of the
same kind stops at once (the default action).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from upop.utils.dist import DistInfo

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number
_received: list[int] = []


class Interrupted(Exception):  # noqa: N818  (a stop the user asked for, not an error)
    """The run stopped on a signal after its last step; ``where`` says what was saved."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(where)
        self.signum, self.where = signum, where

    @property
    def exit_code(self) -> int:
        return CODES.get(self.signum, 1)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum: int, frame: object) -> None:
    if signum in _received:  # the second time: the default action, now
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _received.append(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT request a clean stop instead of ending the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in CODES}
    _received.clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()


def requested(info: DistInfo, local_error: bool = False) -> tuple[int, bool]:
    """(the signal number a stop was requested by on any rank, 0 if none; whether any rank has ``local_error``).
    Collective under DDP: every rank calls it at the same point."""
    flags = torch.tensor([_received[0] if _received else 0, int(local_error)])
    if info.distributed and dist.is_initialized():
        flags = flags.to(info.device if info.device.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1])
