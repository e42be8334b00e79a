"""What a running job tells: a JSON-lines log written whole or not at all, mirrored to TensorBoard event files when
asked (or when tensorboard is installed), and progress (a bar on a terminal, a line every so often in a job log)."""

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


def tensorboard_dir(run_dir: Path, log_dir: str | None) -> Path | None:
    """Where a run's TensorBoard events go: ``log_dir`` when given ("none": nowhere), else ``run_dir``/tb when
    tensorboard is installed, else nowhere."""
    if log_dir is not None:
        return None if log_dir == "none" else Path(log_dir)
    from upop.utils.extras import available

    return run_dir / "tb" if available("tensorboard") else None


class TensorBoard:
    """The scalars of every log record as TensorBoard events: tag ``<phase>/<key>`` (nested values such as the
    selection metrics as ``<phase>/select/<metric>``, the kept fractions per tower as ``<phase>/kept_by_tower/...``)
    at the record's step of its phase; pictures as images."""

    SKIP = ("phase", "epoch", "step", "seconds")

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def write(self, record: dict[str, Any]) -> None:
        phase, step = record.get("phase", "run"), int(record.get("step", 0))

        def scalars(prefix: str, values: dict[str, Any]) -> None:
            for key, value in values.items():
                if isinstance(value, dict):
                    scalars(f"{prefix}/{key}", value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

        scalars(phase, {k: v for k, v in record.items() if k not in self.SKIP})
        self.writer.flush()

    def image(self, tag: str, png: bytes) -> None:
        import io

        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class JsonlLog:
    """Appends one JSON object per line (main rank only). A line is written whole or not at all: when the disk is
    full the file is cut back to where it was and the error kept in ``error`` for the loop to stop on (every rank
    together). With ``tensorboard`` (a directory), every record is also written there as TensorBoard events."""

    def __init__(self, path: Path | None, info: DistInfo, tensorboard: Path | None = None) -> None:
        self.path = path if info.is_main else None
        self.error: str | None = None
        self.tensorboard = TensorBoard(tensorboard) if tensorboard is not None and info.is_main else None

    def image(self, tag: str, png: bytes) -> None:
        """A picture (PNG bytes) into the TensorBoard events, if they are written."""
        if self.tensorboard is not None:
            self.tensorboard.image(tag, png)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

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
        if self.tensorboard is not None:
            self.tensorboard.write(record)
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
