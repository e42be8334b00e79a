"""Widths a device runs at full speed, measured: what ``align="auto"`` resolves to.

Matrix-product and attention kernels run fastest at widths that are multiples of their tile sizes. On an H200 in bf16
a head_dim or MLP width that is not a multiple of 8 runs 2-5x slower than its share of the work
(``benchmarks/gpu_widths.py``), so an element-wise 2x model can be slower than dense there; on a CPU in fp32 the
penalty is small. Rather than assume a number, ``measure_alignment`` times probe modules shaped like the model's own
structures (input width, heads, tokens, batch) on the run's device, in the precisions it will run in: for each
candidate alignment a it times a width that is a multiple of a but not of 2a, just below a reference width that is a
multiple of the largest candidate, and picks for each kind the smallest a whose widths (and those of every larger
candidate) run no slower than ``tolerance`` times the reference width.

Measurements are cached per device, precision and probe shape in ``$UPOP_CACHE_DIR/widths.json`` (default
``~/.cache/upop``), so runs on one machine resolve "auto" alike (a resumed search also keeps the alignment it
started with: the Pruner's state holds it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from upop.core.config import PruneConfig
from upop.errors import UPopError
from upop.utils.dist import broadcast_from_main
from upop.utils.files import atomic_write

CANDIDATES = (1, 2, 4, 8, 16, 32)
# A pruned width must run no slower than the larger reference width, up to the timer's noise: a width more than
# this much slower is not at full speed. A GPU's clock is steady (2-3%), but shared CPU cores spike, so on a CPU only
# a large penalty counts. 1.5 on the GPU let an H200 keep Segmenter head_dims of 28/36/44 (multiples of 4, measured
# 1.44x the time of 32 in bf16): the default 2x Segmenter ran 1.03x slower than dense there (docs, GPU speed).
TOLERANCE = {"cuda": 1.05, "cpu": 1.5}
DEFAULT_SHAPE = (32, 64)  # (batch, tokens) probed when the Pruner was given no example inputs


class AttentionProbe(nn.Module):
    """An attention module of ``heads`` heads of ``head_dim``: fused qkv projection, SDPA, output projection."""

    def __init__(self, width: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(width, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class MlpProbe(nn.Module):
    """An MLP of ``hidden`` neurons: fc1, GELU, fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class Alignment:
    """The resolved alignment per kind, and how it was found (``probes``: per kind and precision, the relative time
    of each probed width)."""

    attn: int
    mlp: int
    device: str = ""
    probes: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: str) -> int:
        return self.attn if kind == "attn" else self.mlp

    def to_dict(self) -> dict[str, Any]:
        return {"attn": self.attn, "mlp": self.mlp, "device": self.device, "probes": self.probes}


def time_module(module: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Seconds per call of ``module(x)`` in ``dtype`` (None: fp32): the clock every measurement here reads, so a
    simulator of another device (or a test) can stand in for it. The fastest of 5 repeats of the mean time of enough
    calls to last about 2 ms (a floor against timer noise)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else torch.autocast(x.device.type, enabled=False)
    with torch.inference_mode(), autocast:
        for _ in range(2):
            module(x)
        sync()
        start = time.perf_counter()
        module(x)
        sync()
        calls = max(1, min(50, int(0.002 / max(time.perf_counter() - start, 1e-6))))
        best = float("inf")
        for _ in range(5):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            sync()
            best = min(best, (time.perf_counter() - start) / calls)
    return best


def tolerance(device: torch.device) -> float:
    """How much slower than the reference width a probed width may run and still count as full speed on ``device``."""
    return TOLERANCE["cuda"] if device.type == "cuda" else TOLERANCE["cpu"]


def choose_alignment(
    size: int, build, x: torch.Tensor, dtype: torch.dtype | None, slack: float | None = None
) -> tuple[int, dict[int, float]]:
    """(the smallest candidate alignment at full speed, {width: time relative to the reference width}) for a
    structure of ``size`` elements, ``build(width)`` making a probe module of that width, timed at input ``x``;
    ``slack``: the tolerance (default: ``tolerance(x.device)``)."""
    slack = tolerance(x.device) if slack is None else slack
    usable = [a for a in CANDIDATES if 2 * a <= size]
    if len(usable) < 2:
        return 1, {}
    top = usable[-1]
    reference = top * max(1, (size // 2) // top)  # about half the dense width: where pruned widths lie
    widths = {a: reference - a for a in usable[:-1]}
    modules = {w: build(w).to(x.device) for w in [reference, *widths.values()]}

    def relative(w: int) -> float:
        return time_module(modules[w], x, dtype) / time_module(modules[reference], x, dtype)

    measured = {w: relative(w) for w in widths.values()}
    for w in measured:  # a real penalty repeats; a spike from another tenant does not: keep the best of 3
        for _ in range(2):
            if measured[w] > slack:
                measured[w] = min(measured[w], relative(w))
    slow = {a: measured[w] > slack for a, w in widths.items()}
    chosen = next(a for a in usable if not any(slow[b] for b in usable[:-1] if b >= a and b % a == 0))
    return chosen, {reference: 1.0, **measured}


def cache_path() -> Path:
    return Path(os.environ.get("UPOP_CACHE_DIR") or Path.home() / ".cache" / "upop") / "widths.json"


def _cached(key: str, measure: Callable[[], Any]) -> Any:
    """The cached measurement under ``key``, or ``measure()`` (JSON-able), stored for next time.

    A measurement draws random probes and inputs; it runs on a fork of the random streams, so a run's seeded
    initialisation, data order and augmentation are the same whether the cache was warm or cold."""
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            cache[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(cache, indent=1, sort_keys=True).encode())
        except OSError:
            pass  # a read-only home: measure again next time
    return cache[key]


def measure_alignment(
    structures: list, device: torch.device, batch: int | None = None, precisions: tuple[str, ...] = ("fp32",)
) -> Alignment:
    """Time probes shaped like the largest structure of each kind on ``device`` in each of ``precisions`` ("fp32",
    "bf16", "fp16") and return the alignment per kind (the largest over the precisions). Cached (see above)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    name = str(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    result = Alignment(1, 1, name)
    for kind in ("attn", "mlp"):
        of_kind = [s for s in structures if s.kind == kind]
        if not of_kind:
            continue
        s = max(of_kind, key=lambda s: s.size)
        width, heads = s.rows[0].in_features, s.heads
        tokens, rows = s.tokens or DEFAULT_SHAPE[1], batch or DEFAULT_SHAPE[0]

        def build(w: int, width=width, heads=heads, kind=kind) -> nn.Module:
            return AttentionProbe(width, heads, w) if kind == "attn" else MlpProbe(width, w)

        chosen = 1
        for precision in precisions:
            key = (
                f"{name}|{precision}|{kind}|width {width}|heads {heads}|tokens {tokens}|batch {rows}"
                f"|tolerance {tolerance(device)}|size {s.size}"  # one judged by another rule is measured again
            )

            def measure(precision=precision, build=build, size=s.size, shape=(rows, tokens, width)):
                align, relative = choose_alignment(size, build, torch.randn(*shape, device=device), dtypes[precision])
                return {"align": align, "relative": {str(w): round(t, 3) for w, t in relative.items()}}

            found = _cached(key, measure)
            a, relative = int(found["align"]), found["relative"]
            result.probes[f"{kind} {precision}"] = relative
            chosen = max(chosen, a)
        setattr(result, kind, chosen)
    return result


# ------------------------------------------------------------------------------------------------ latency tables
LATENCY_POINTS = 8  # widths measured per structure shape: n * k / 8 for k = 1..8


def _shape_key(s, batch: int, precision: str, device_name: str) -> str:
    unit = "heads" if s.block > 1 else "dims" if s.kind == "attn" else "neurons"
    width = s.rows[0].in_features
    return (
        f"{device_name}|{precision}|latency|{s.kind} {unit}|width {width}|heads {s.heads}|block {s.block}"
        f"|tokens {s.tokens or DEFAULT_SHAPE[1]}|batch {batch}|size {s.size}"
    )


def _probe(s, w: int) -> nn.Module:
    """A module shaped like structure ``s`` kept at ``w`` elements."""
    width = s.rows[0].in_features
    if s.kind == "mlp":
        return MlpProbe(width, w)
    if s.block > 1:  # whole heads: w heads of the structure's head_dim
        return AttentionProbe(width, w, s.block)
    return AttentionProbe(width, s.heads, w)


def _measure_curve(s, device: torch.device, batch: int, dtype: torch.dtype | None) -> dict[str, float]:
    x = torch.randn(batch, s.tokens or DEFAULT_SHAPE[1], s.rows[0].in_features, device=device)
    widths = sorted({max(1, round(s.size * k / LATENCY_POINTS)) for k in range(1, LATENCY_POINTS + 1)})
    return {str(w): time_module(_probe(s, w).to(device), x, dtype) for w in widths}


def curve_from_table(table: dict[str, float], n: int) -> torch.Tensor:
    """T(w), w = 0..n, from measured {width: seconds}: made non-decreasing (timing noise must not make an element's
    removal cost negative), interpolated linearly between measured widths, extrapolated to T(0) along the first
    segment (at least 0)."""
    points = sorted((int(w), t) for w, t in table.items())
    widths = torch.tensor([w for w, _ in points], dtype=torch.float64)
    times = torch.cummax(torch.tensor([t for _, t in points], dtype=torch.float64), 0).values
    if len(points) == 1:
        return torch.linspace(0, float(times[0]), n + 1, dtype=torch.float64)
    grid = torch.arange(n + 1, dtype=torch.float64)
    index = torch.searchsorted(widths, grid).clamp(1, len(points) - 1)
    w0, w1, t0, t1 = widths[index - 1], widths[index], times[index - 1], times[index]
    curve = t0 + (grid - w0) * (t1 - t0) / (w1 - w0)
    return torch.cummax(curve.clamp(min=0), 0).values


def latency_curves(
    structures: list, device: torch.device, batch: int | None, precision: str, table_file: str | None = None
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Per structure, the measured latency T(w) of a module shaped like it at every kept width w = 0..n (seconds per
    forward of ``batch`` samples, in ``precision`` on ``device``), and the table it came from. Shapes shared by
    several structures are measured once; measurements are cached like the alignment's. With ``table_file`` (built on
    the deploying machine, e.g. by ``upop latency-table``) nothing is measured: every shape must be in it."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    name = str(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    rows = batch or DEFAULT_SHAPE[0]
    given: dict[str, Any] | None = None
    if table_file is not None:
        try:
            given = json.loads(Path(table_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read the latency table {table_file}: {e}") from None
    tables: dict[str, Any] = {}
    curves = []
    for s in structures:
        key = _shape_key(s, rows, precision, name)
        if key not in tables:
            if given is not None:
                found = next((v for k, v in given.items() if k.split("|", 1)[1] == key.split("|", 1)[1]), None)
                if found is None:
                    raise UPopError(
                        f"the latency table {table_file} has no entry for {key.split('|', 2)[2]} in {precision}; "
                        "build it for this model and batch on the deploying machine (upop latency-table)"
                    )
                tables[key] = found
            else:
                tables[key] = _cached(key, lambda s=s: _measure_curve(s, device, rows, dtypes[precision]))
        curves.append(curve_from_table(tables[key], s.size))
    return curves, tables


# ------------------------------------------------------------------------------------------------ for the Pruner
def structure_costs(
    structures: list, config: PruneConfig, device: torch.device, batch: int | None
) -> tuple[list[float | torch.Tensor], dict[str, Any]]:
    """Per structure, the cost of an element (``config.cost`` "params", "flops" or "paper") or the measured latency
    curve T(w) (rank 0's on every rank: one decision everywhere), and the latency table it came from ({} otherwise)."""
    if config.cost == "paper":
        return [float(config.attn_cost) if s.kind == "attn" else 1.0 for s in structures], {}  # type: ignore[arg-type]
    if config.cost != "latency":
        return [float(s.element_cost(config.cost)) for s in structures], {}
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    curves, tables = latency_curves(structures, device, batch, precision, config.latency_table)
    flat = broadcast_from_main(torch.cat(curves).to(device))
    return list(torch.split(flat.cpu(), [s.size + 1 for s in structures])), tables


def resolve_alignment(
    structures: list,
    config: PruneConfig,
    device: torch.device,
    batch: int | None,
    precisions: tuple[str, ...] | None = None,
) -> Alignment:
    """The alignment per kind: as configured, or for "auto" measured on ``device`` in ``precisions`` (default fp32
    and, on a GPU, its half precision, where models are usually deployed) at ``batch``; rank 0's measurement on every
    rank."""
    given = {k: getattr(config, f"align_{k}") for k in ("attn", "mlp")}
    if "auto" not in given.values():
        return Alignment(given["attn"], given["mlp"], "given")
    if precisions is None:
        half = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
        precisions = ("fp32", half) if device.type == "cuda" else ("fp32",)
    # whole heads: the widths do not change, only the number of heads, which no tile size constrains
    probed = [s.dims_view() for s in structures if s.block == 1]
    measured = measure_alignment(probed, device, batch, tuple(precisions))
    for kind, value in given.items():
        if value != "auto":
            setattr(measured, kind, value)
    agreed = broadcast_from_main(torch.tensor([measured.attn, measured.mlp], device=device))
    measured.attn, measured.mlp = int(agreed[0]), int(agreed[1])
    return measured
