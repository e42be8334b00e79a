"""What a running job tells: a JSON-lines log written whole or not at all, and progress (a bar on a terminal, a line
every so often in a job log)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from tqdm import tqdm

from upop.utils.dist import DistInfo


class JsonlLog:
    """Appends one JSON object per line (main rank only). A line is written whole or not at all: when the disk is
    full the file is cut back to where it was and the error kept in ``error`` for the loop to stop on (every rank
    together)."""

    def __init__(self, path: Path | None, info: DistInfo) -> None:
        self.path = path if info.is_main else None
        self.error: str | None = None

    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop what was logged after a checkpoint, so a resumed run's log reads like an uninterrupted one."""
        if self.path is not None and self.path.exists():
            os.truncate(self.path, min(size, self.path.stat().st_size))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None or self.error is not None:
            return
        size = self.size()
        try:
            with open(self.path, "ab") as f:
                f.write((json.dumps(record) + "\n").encode())
                f.flush()
        except OSError as e:
            self.error = f"cannot append to {self.path}: {e.strerror or e}"
            try:
                os.truncate(self.path, size)
            except OSError:
                pass


class Progress:
    """A tqdm bar on a terminal; otherwise (a job log) one line every ``UPOP_PROGRESS_SECONDS`` seconds (default 30)
    and at every epoch end, so a redirected run is never silent for long."""

    def __init__(self, loader: DataLoader, desc: str, info: DistInfo, total: int, done: int) -> None:
        self.desc, self.total, self.done = desc, total, done
        self.tty = sys.stderr.isatty()
        self.active = info.is_main
        self.every = float(os.environ.get("UPOP_PROGRESS_SECONDS", "30"))
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(loader, desc=desc, disable=not (self.active and self.tty), leave=False, dynamic_ncols=True)
        self.postfix: dict[str, str] = {}
        self.postfix_of: dict[str, Callable[[], str]] = {}

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar)

    def update(self, step_in_epoch: int, postfix: dict[str, Callable[[], str]]) -> None:
        """After a step; ``postfix`` values are computed only when shown (a bar refresh or a line)."""
        self.postfix_of = postfix
        now = time.perf_counter()
        if now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        self.postfix = {k: f() for k, f in postfix.items()}
        if self.tty:
            self.bar.set_postfix(**self.postfix)
        elif self.active:
            self.line(step_in_epoch)

    def finish(self) -> None:
        """The epoch-end line (in a job log), with the last step's values."""
        self.postfix = {k: f() for k, f in self.postfix_of.items()}
        self.line(self.total, end=" done")

    def line(self, step_in_epoch: int, end: str = "") -> None:
        if not self.active or self.tty:
            return
        elapsed = time.perf_counter() - self.start
        steps = step_in_epoch - self.done
        left = elapsed / steps * (self.total - step_in_epoch) if steps > 0 else 0.0
        extra = "".join(f" {k} {v}" for k, v in self.postfix.items())
        print(
            f"upop: {self.desc} step {step_in_epoch}/{self.total}{extra} ({elapsed:.0f} s"
            + (f", about {left:.0f} s left in the epoch)" if step_in_epoch < self.total else ")")
            + end,
            flush=True,
        )
