"""ProRes schedules: the residual-branch scale a(l, t) of block l at optimizer step t.

Pure functions of (step, global 1-based block index, number of blocks, total warmup); no state.
The user gives the TOTAL warmup W (``--prores-warmup-steps``, the reference code's
``prores_warmup_steps``): the number of steps after which every block has its final value.
The per-block warmup T of the paper's formulas follows from W:

| schedule           | a(l, t)                                       | T from W | block l is final at |
|--------------------|-----------------------------------------------|----------|---------------------|
| linear             | min(t / (T l), 1)                             | W / L    | T l                 |
| linear-sqrt        | min(t / (T l), 1) ** 0.5                      | W / L    | T l                 |
| linear-square      | min(t / (T l), 1) ** 2                        | W / L    | T l                 |
| equal              | min(t / T, 1)                                 | W        | T                   |
| reverse            | min(t / (T (L - l + 1)), 1)                   | W / L    | T (L - l + 1)       |
| stagewise-0        | clip((t - T (l-1)) / T, 0, 1)                 | W / L    | T l                 |
| stagewise-L        | clip((t - T (l-1)) / T, 0, 1) (1 - 1/L) + 1/L | W / L    | T l                 |
| stagewise-sqrt-l   | clip(...) (1 - 1/sqrt(l)) + 1/sqrt(l)         | W / L    | T l                 |
| stagewise-sqrt-L   | clip(...) (1 - 1/sqrt(L)) + 1/sqrt(L)         | W / L    | T l                 |
| fix-L              | 1 / L                                         | (none)   | never (constant)    |
| fix-sqrt-L         | 1 / sqrt(L)                                   | (none)   | never (constant)    |
| fix-sqrt-l         | 1 / sqrt(l)                                   | (none)   | never (constant)    |
| none               | 1 (ProRes off)                                | (none)   | always              |

T may be fractional (W not a multiple of L); the formulas are evaluated in float64.

``spacing="official"`` (``--prores-warmup-spacing official``) spaces the blocks as the official
ProRes code does: block l reaches its final value at E_l = linspace(floor(W/L), W, L)[l] instead
of E_l = T l (the same when L divides W). Every schedule above is written with the E_l: linear
family t / E_l, reverse t / E_{L-l+1}, stagewise (t - E_{l-1}) / (E_l - E_{l-1}) with E_0 = 0;
equal keeps E = W.
"""

from __future__ import annotations

import math
from typing import Optional

SCHEDULES = (
    "none",
    "linear",
    "linear-sqrt",
    "linear-square",
    "equal",
    "reverse",
    "stagewise-0",
    "stagewise-L",
    "stagewise-sqrt-l",
    "stagewise-sqrt-L",
    "fix-L",
    "fix-sqrt-L",
    "fix-sqrt-l",
)

#: Schedules whose value never changes, and therefore take no warmup.
CONSTANT_SCHEDULES = ("none", "fix-L", "fix-sqrt-L", "fix-sqrt-l")


def needs_warmup(schedule: str) -> bool:
    return schedule not in CONSTANT_SCHEDULES


WARMUP_SPACINGS = ("even", "official")


def per_block_warmup(schedule: str, num_layers: int, warmup: float) -> float:
    """T, the warmup of one block, from the total warmup W (see the module table)."""
    if not needs_warmup(schedule):
        return 0.0
    return float(warmup) if schedule == "equal" else float(warmup) / num_layers


def warmup_end(block: int, num_layers: int, warmup: float, spacing: str = "even") -> float:
    """E_l: the step at which the ramp of block ``block`` (1-based; 0 gives E_0 = 0) ends, for the
    schedules whose blocks ramp one after another or at once (linear family, stagewise)."""
    if block == 0:
        return 0.0
    if spacing == "official":
        first = float(math.floor(warmup / num_layers))
        if num_layers == 1:
            return first
        return first + (block - 1) * (float(warmup) - first) / (num_layers - 1)
    return per_block_warmup("linear", num_layers, warmup) * block


def _ramp(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def prores_value(schedule: str, step: int, layer: int, num_layers: int, warmup: float,
                 spacing: str = "even") -> float:
    """a(l, t) for global 1-based block ``layer`` of ``num_layers`` at optimizer step ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown ProRes schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    t, l, L = float(step), layer, num_layers
    done = final_step(schedule, layer, num_layers, warmup, spacing) if needs_warmup(schedule) else None
    if done is not None and t >= done:
        return 1.0  # exactly, also where a fractional T rounds to 0.999...
    if schedule == "none":
        return 1.0
    if schedule == "fix-L":
        return 1.0 / L
    if schedule == "fix-sqrt-L":
        return 1.0 / math.sqrt(L)
    if schedule == "fix-sqrt-l":
        return 1.0 / math.sqrt(l)
    if schedule in ("linear", "linear-sqrt", "linear-square"):
        r = min(t / warmup_end(l, L, warmup, spacing), 1.0)
        return {"linear": r, "linear-sqrt": math.sqrt(r), "linear-square": r * r}[schedule]
    if schedule == "equal":
        return min(t / float(warmup), 1.0)
    if schedule == "reverse":
        return min(t / warmup_end(L - l + 1, L, warmup, spacing), 1.0)
    lo, hi = warmup_end(l - 1, L, warmup, spacing), warmup_end(l, L, warmup, spacing)
    width = hi - lo if spacing == "official" else per_block_warmup(schedule, L, warmup)  # even: T itself
    stage = _ramp((t - lo) / width)
    if schedule == "stagewise-0":
        return stage
    if schedule == "stagewise-L":
        return stage * (1.0 - 1.0 / L) + 1.0 / L
    if schedule in ("stagewise-sqrt-l", "stagewise-sqrt-L"):
        floor = 1.0 / math.sqrt(l if schedule == "stagewise-sqrt-l" else L)
        return stage * (1.0 - floor) + floor
    raise ValueError(f"unknown ProRes schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def final_step(schedule: str, layer: int, num_layers: int, warmup: float,
               spacing: str = "even") -> Optional[float]:
    """First step from which block ``layer`` has a == 1 for good (its multiply can be dropped).

    None when that never happens (the fix-* schedules keep a constant below 1).
    """
    if not needs_warmup(schedule):
        return 0.0 if prores_value(schedule, 0, layer, num_layers, warmup) == 1.0 else None
    if schedule == "stagewise-sqrt-l" and layer == 1:
        return 0.0  # its floor 1/sqrt(1) is already 1
    if schedule in ("stagewise-L", "stagewise-sqrt-L") and num_layers == 1:
        return 0.0
    if schedule == "equal":
        return float(warmup)
    if schedule == "reverse":
        return warmup_end(num_layers - layer + 1, num_layers, warmup, spacing)
    return warmup_end(layer, num_layers, warmup, spacing)


def unfinished_at(step: int, schedule: str, num_layers: int, warmup: float, spacing: str = "even") -> list:
    """The blocks still warming up at ``step`` (would reach a == 1 only later), as (block, a)."""
    if not needs_warmup(schedule):
        return []
    return [(l, prores_value(schedule, step, l, num_layers, warmup, spacing))
            for l in range(1, num_layers + 1)
            if final_step(schedule, l, num_layers, warmup, spacing) > step]
