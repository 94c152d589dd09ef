"""Each ProRes schedule equals its formula (the ProRes paper, Table 5) at chosen steps."""

import math

import pytest

from megatron_prores.schedules import SCHEDULES, final_step, prores_value

L, W = 4, 100  # total warmup 100 -> T = 25 per block (100 for 'equal')


def clip01(x):
    return min(max(x, 0.0), 1.0)


# Formulas written out from the ProRes paper with T derived from the total warmup W.
FORMULAS = {
    "none": lambda t, l: 1.0,
    "linear": lambda t, l: min(t / (25 * l), 1),
    "linear-sqrt": lambda t, l: min(t / (25 * l), 1) ** 0.5,
    "linear-square": lambda t, l: min(t / (25 * l), 1) ** 2,
    "equal": lambda t, l: min(t / 100, 1),
    "reverse": lambda t, l: min(t / (25 * (L - l + 1)), 1),
    "stagewise-0": lambda t, l: clip01((t - 25 * (l - 1)) / 25),
    "stagewise-L": lambda t, l: clip01((t - 25 * (l - 1)) / 25) * (1 - 1 / L) + 1 / L,
    "stagewise-sqrt-l": lambda t, l: clip01((t - 25 * (l - 1)) / 25) * (1 - 1 / math.sqrt(l)) + 1 / math.sqrt(l),
    "stagewise-sqrt-L": lambda t, l: clip01((t - 25 * (l - 1)) / 25) * (1 - 1 / math.sqrt(L)) + 1 / math.sqrt(L),
    "fix-L": lambda t, l: 1 / L,
    "fix-sqrt-L": lambda t, l: 1 / math.sqrt(L),
    "fix-sqrt-l": lambda t, l: 1 / math.sqrt(l),
}


def test_every_published_schedule_is_covered():
    assert set(FORMULAS) == set(SCHEDULES)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("step", [0, 1, 10, 25, 37, 50, 74, 99, 100, 1000])
def test_value_equals_formula(schedule, step):
    for l in range(1, L + 1):
        assert prores_value(schedule, step, l, L, W) == pytest.approx(FORMULAS[schedule](step, l), abs=1e-15)


def test_hand_computed_values():
    # linear, W=100, L=4: block 2 reaches 1 at step 50
    assert prores_value("linear", 30, 2, 4, 100) == pytest.approx(0.6)
    assert prores_value("linear", 50, 2, 4, 100) == 1.0
    # reverse: the deepest block is first to finish
    assert prores_value("reverse", 25, 4, 4, 100) == 1.0
    assert prores_value("reverse", 25, 1, 4, 100) == pytest.approx(0.25)
    # stagewise-0: block 3 ramps over steps 50..75
    assert prores_value("stagewise-0", 60, 3, 4, 100) == pytest.approx(0.4)
    assert prores_value("stagewise-0", 49, 3, 4, 100) == 0.0
    # published default: T = 1000 per block, 24 layers -> W = 24000
    assert prores_value("linear", 12000, 12, 24, 24000) == 1.0
    assert prores_value("linear", 12000, 24, 24, 24000) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if not s.startswith("fix") and s != "none"])
def test_every_block_starts_at_zero_or_floor_and_ends_at_one(schedule):
    for l in range(1, L + 1):
        start = prores_value(schedule, 0, l, L, W)
        assert start == pytest.approx(FORMULAS[schedule](0, l))
        assert prores_value(schedule, W, l, L, W) == 1.0  # all done at the total warmup
        done = final_step(schedule, l, L, W)
        assert prores_value(schedule, done, l, L, W) == 1.0
        if done > 0:
            assert prores_value(schedule, done - 1, l, L, W) < 1.0


def test_fix_schedules_never_finish():
    for s in ("fix-L", "fix-sqrt-L"):
        assert final_step(s, 2, L, 0) is None
    assert final_step("fix-sqrt-l", 1, L, 0) == 0.0  # 1/sqrt(1) == 1
    assert final_step("fix-sqrt-l", 2, L, 0) is None
    assert final_step("none", 3, L, 0) == 0.0


def test_fractional_per_block_warmup():
    # W = 90 over L = 4 blocks: T = 22.5, block 3 final at 67.5, reached at step 68
    assert prores_value("linear", 45, 3, 4, 90) == pytest.approx(45 / 67.5)
    assert final_step("linear", 3, 4, 90) == 67.5
    assert prores_value("linear", 68, 3, 4, 90) == 1.0
    assert prores_value("stagewise-L", 50, 3, 4, 90) == pytest.approx((50 - 45) / 22.5 * 0.75 + 0.25)
    for s in SCHEDULES:
        for l in range(1, 5):
            done = final_step(s, l, 4, 90)
            if done is not None:  # exactly 1 from the final step on, also with fractional T
                assert prores_value(s, math.ceil(done), l, 4, 90) == 1.0
