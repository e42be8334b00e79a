"""The output directory of a job: configuration first, an exclusive lock, the log, checkpoints while it runs, the
results at the end (each file atomically, report.json last), and resuming an interrupted run in it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upop.engine.checkpoint import Checkpointer, Snapshot
from upop.engine.lock import LOCK_FILE, DirLock
from upop.engine.logs import JsonlLog, tensorboard_dir
from upop.errors import UPopError
from upop.utils import dist as D
from upop.utils.files import atomic_write

RUN_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Checkpointing:
    """Checkpoints of a job: every ``every`` steps (0: only at epoch ends) and at every epoch end, the newest ``keep``
    kept; ``resume`` continues the run in the output directory from its newest good checkpoint (or starts it when
    there is none, so the same command serves the first start and every restart)."""

    every: int = 500
    keep: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise UPopError(
                f"--checkpoint-every must be >= 0 and --keep-checkpoints >= 1, got {self.every} and {self.keep}"
            )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# may differ in a resumed run: they do not change its results
FREE_SETTINGS = ("device", "workers", "grad_checkpointing", "log_dir")


def _config_difference(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key in FREE_SETTINGS or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found = _config_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
            continue
        return f"{prefix}{key} (saved {a!r}, now {b!r})"
    return None


class RunDir:
    """The output directory of a job while it runs and after; a context manager.

    While running it holds ``config.json`` (written first), ``log.jsonl``, ``checkpoints/`` and the lock
    ``.upop.lock`` (a second run into the same directory is refused); the results are written at the end, each file
    atomically, ``report.json`` last: a directory with ``report.json`` is complete, one without it is an interrupted
    run that ``resume`` continues. Bad input is found before the directory is created.
    """

    def __init__(
        self, path: str | os.PathLike, config: dict[str, Any], overwrite: bool, ckpt: Checkpointing, info: D.DistInfo
    ) -> None:
        self.path, self.info, self.done = Path(path), info, None
        self.lock = DirLock(self.path)
        config = _jsonable(config)
        occupied = self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir()))
        if occupied and ckpt.resume:
            saved = read_run_config(self.path)
            if not saved:
                raise UPopError(f"{self.path} holds no UPop run to resume (no {RUN_CONFIG_FILE})")
            diff = _config_difference(saved, config)
            if diff:
                raise UPopError(f"the run in {self.path} was started with other settings: {diff}")
            if (self.path / "report.json").is_file():
                self.done = json.loads((self.path / "report.json").read_text())
                if info.is_main:
                    print(f"upop: {self.path} is already complete (it has report.json); nothing to resume", flush=True)
        elif occupied and not overwrite:
            raise UPopError(
                f"output directory {self.path} exists and is not empty; pass --overwrite to replace it "
                "or --resume to continue an interrupted run in it"
            )
        D.barrier(info)  # every rank has looked before rank 0 writes
        error: UPopError | None = None
        if info.is_main and self.done is None:
            try:
                self._claim(config, replace=occupied and not ckpt.resume)
            except UPopError as e:
                error = e
        if not D.all_ok(error is None, info):
            raise error or UPopError(f"the main rank could not prepare the output directory {self.path}")
        try:
            self.checkpointer = Checkpointer(self.path / "checkpoints", info, ckpt.every, ckpt.keep)
            self.snapshot = self.checkpointer.latest() if ckpt.resume and self.done is None else None
            events = tensorboard_dir(self.path, (config.get("run") or {}).get("log_dir"))
            self.log = JsonlLog(self.path / "log.jsonl", info, events if self.done is None else None)
            if self.snapshot is not None:
                self.log.truncate(self.snapshot.meta["log_size"])
            elif self.done is None:
                self.log.truncate(0)
        except BaseException:
            self.lock.release()
            raise

    def _claim(self, config: dict[str, Any], replace: bool) -> None:
        """Create the directory, lock it (before anything in it is changed), clear it for --overwrite, write the
        configuration."""
        try:
            if replace and not self.path.is_dir():
                self.path.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            if replace:
                for entry in self.path.iterdir():
                    if entry.name != LOCK_FILE:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            if not (self.path / RUN_CONFIG_FILE).is_file():
                atomic_write(self.path / RUN_CONFIG_FILE, json_bytes(config))
        except OSError as e:
            self.lock.release()
            raise UPopError(f"cannot write the output directory {self.path}: {e.strerror or e}") from None
        except UPopError:
            raise

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()
        self.lock.release()

    def resume_from(self, phase_index: int) -> Snapshot | None:
        """The checkpoint to continue phase ``phase_index`` from, if the run stopped in it."""
        snap = self.snapshot
        return snap if snap is not None and snap.key[0] == phase_index else None

    def finish(self, report: dict[str, Any], files: dict[str, bytes], write_model: Any = None) -> None:
        """Write the results atomically (``write_model(dir)`` for the weights), ``report.json`` last; then drop the
        checkpoints."""
        error = None
        try:
            if self.info.is_main:
                if write_model is not None:
                    write_model(self.path)
                for name, data in files.items():
                    atomic_write(self.path / name, data)
                atomic_write(self.path / "report.json", json_bytes(report))
        except (OSError, UPopError) as e:
            error = UPopError(
                f"cannot write the results into {self.path}: {getattr(e, 'strerror', None) or e} "
                "(the checkpoints are kept; rerun with --resume)"
            )
        if not D.all_ok(error is None, self.info):
            raise error or UPopError(f"the main rank could not write the results into {self.path}")
        self.checkpointer.clear()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_run_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UPopError(f"{path} is not valid JSON") from None
