"""Atomic, verifiable checkpoints for resuming a run exactly.

A checkpoint is a directory ``checkpoints/<phase>-<name>-<step>/`` holding

- ``model.safetensors`` (and ``best.safetensors`` when a keep-best phase has a best epoch): weights, safetensors;
- ``state.pt``: optimizer, LR schedule, AMP scaler, Pruner and loop counters: tensors and plain Python values only,
  read back with ``torch.load(weights_only=True)`` (no pickled code runs);
- ``rng-rank<r>.pt``: the RNG states of rank r (every rank writes its own);
- ``meta.json``: what the job needs to continue (phase, epoch, position in the epoch, history, results of earlier
  phases, the log size);
- ``manifest.json``, written last: size and sha256 of every other file.

It is written into a temporary directory (each file fsynced), then renamed into place and the parent fsynced, so a
kill at any instant leaves the previous checkpoint or the new one, never a half-written one. On resume the newest
checkpoint whose manifest verifies is used; a corrupt or truncated one is reported and skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from upop.errors import UPopError
from upop.utils.dist import DistInfo, all_ok, barrier, broadcast_int
from upop.utils.files import fsync_dir, write_file

MANIFEST = "manifest.json"
FORMAT = "upop-checkpoint"
VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state() -> dict[str, Any]:
    """torch, python and numpy (timm's Mixup draws from it) RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """What one checkpoint holds, in memory. ``key`` orders checkpoints: (phase index, step)."""

    key: tuple[int, int]
    phase: str
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    best_weights: dict[str, torch.Tensor] | None = None
    rng: dict[str, Any] = field(default_factory=rng_state)
    path: Path | None = None


class Checkpointer:
    """Writes checkpoints under ``root`` every ``every`` steps (0: only at epoch ends) and keeps the newest ``keep``.

    ``write`` puts bytes into a file (default: ``write_file``); tests replace it to simulate a crash or a full disk."""

    def __init__(
        self,
        root: str | os.PathLike,
        info: DistInfo,
        every: int = 500,
        keep: int = 2,
        write: Callable[[Path, bytes], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.root, self.info, self.every, self.keep = Path(root), info, every, keep
        self._writer = write
        self.say = say or (lambda msg: print(f"upop: {msg}", flush=True) if info.is_main else None)

    def write(self, path: Path, data: bytes) -> None:
        (self._writer or write_file)(path, data)

    @staticmethod
    def dirname(key: tuple[int, int], phase: str) -> str:
        return f"{key[0]}-{phase}-{key[1]:09d}"

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, snap: Snapshot) -> Path:
        """Write ``snap`` atomically (collective: every rank calls it). Raises UPopError on every rank if any rank
        could not write; the earlier checkpoints are then untouched."""
        final = self.root / self.dirname(snap.key, snap.phase)
        tmp = self.root / f".tmp-{final.name}"
        error = None
        if self.info.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = e
        barrier(self.info)
        if all_ok(error is None, self.info):  # every rank writes its own RNG state
            try:
                self.write(tmp / f"rng-rank{self.info.rank}.pt", _torch_bytes(snap.rng))
            except OSError as e:
                error = e
        if all_ok(error is None, self.info) and self.info.is_main:
            try:
                files = {"model.safetensors": save(_cpu(snap.weights))}
                if snap.best_weights is not None:
                    files["best.safetensors"] = save(_cpu(snap.best_weights))
                files["state.pt"] = _torch_bytes(snap.state)
                files["meta.json"] = json.dumps(
                    {"format": FORMAT, "version": VERSION, "key": list(snap.key), "phase": snap.phase, **snap.meta},
                    indent=1,
                ).encode()
                for name, data in files.items():
                    self.write(tmp / name, data)
                manifest = {
                    p.name: {"size": p.stat().st_size, "sha256": _sha256(p.read_bytes())} for p in sorted(tmp.iterdir())
                }
                self.write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
                fsync_dir(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.root)
            except OSError as e:
                error = e
        ok = all_ok(error is None, self.info)
        if not ok:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            why = error.strerror or str(error) if error is not None else "another rank failed to write"
            raise UPopError(
                f"cannot write a checkpoint in {self.root}: {why} (the earlier checkpoints are intact; free space "
                "or fix permissions, then rerun with --resume)"
            )
        if self.info.is_main:
            self._prune_old()
        barrier(self.info)
        return final

    def _prune_old(self) -> None:
        for old in self._listed()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def _listed(self) -> list[Path]:
        """Checkpoint directories, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            parts = p.name.split("-")
            if p.is_dir() and len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
                found.append(((int(parts[0]), int(parts[2])), p))
        return [p for _, p in sorted(found, reverse=True)]

    # ------------------------------------------------------------------------------------------------ loading
    def verify(self, path: Path) -> str | None:
        """None if every file listed in the manifest is present with its size and sha256; else what is wrong."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest (the write did not finish)"
        except (json.JSONDecodeError, OSError) as e:
            return f"unreadable manifest ({e})"
        for name in ("model.safetensors", "state.pt", "meta.json"):
            if name not in manifest:
                return f"{name} is not in the manifest"
        for name, want in manifest.items():
            p = path / name
            if not p.is_file():
                return f"{name} is missing"
            data = p.read_bytes()
            if len(data) != want["size"]:
                return f"{name} is truncated ({len(data)} of {want['size']} bytes)"
            if _sha256(data) != want["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def latest(self) -> Snapshot | None:
        """The newest checkpoint that verifies (rank 0 decides, every rank loads the same one), or None."""
        choice = -1
        listed = self._listed()
        if self.info.is_main:
            for i, path in enumerate(listed):
                problem = self.verify(path)
                if problem is None:
                    choice = i
                    break
                older = "; trying an older one" if i + 1 < len(listed) else ""
                self.say(f"checkpoint {path} is unusable: {problem}{older}")
        choice = broadcast_int(choice, self.info)
        if choice < 0:
            if listed and self.info.is_main:
                self.say("no usable checkpoint; starting from the beginning")
            return None
        return self.load(listed[choice])

    def load(self, path: Path) -> Snapshot:
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise UPopError(f"{path} is not a checkpoint this UPop version reads")
            weights = load_file(str(path / "model.safetensors"))
            best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            rng_file = path / f"rng-rank{self.info.rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        except (OSError, SafetensorError, RuntimeError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read the checkpoint {path}: {e}") from None
        if rng is None:
            self.say(f"{path} has no RNG state for rank {self.info.rank} (another world size?); continuing without it")
            rng = {}
        key = (int(meta["key"][0]), int(meta["key"][1]))
        if self.info.is_main:
            self.say(f"resuming from {path}")
        return Snapshot(key, meta["phase"], weights, state, meta, best, rng, path)

    def clear(self) -> None:
        if self.info.is_main:
            shutil.rmtree(self.root, ignore_errors=True)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}  # clone: tied weights
