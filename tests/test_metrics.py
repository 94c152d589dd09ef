"""The online loss-spike score equals OLMo's definition computed over the whole history."""

import math
import random

from megatron_prores.metrics import SpikeScore


def offline_spike_score(losses, total, window=1000, sigmas=7.0):
    """Written out: share of steps i in [max(0.1 T, 2), 0.9 T) whose loss is >= 7 sigma above the
    mean of the previous ``window`` finite losses."""
    spikes = counted = 0
    finite = []  # (step, loss) of finite losses so far
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            continue
        if max(int(0.1 * total), 2) <= i < int(0.9 * total) and finite:
            prev = [l for _, l in finite[-window:]]
            mean = sum(prev) / len(prev)
            std = math.sqrt(sum((x - mean) ** 2 for x in prev) / len(prev))
            counted += 1
            spikes += std > 0 and loss - mean >= sigmas * std
        finite.append((i, loss))
    return spikes / counted if counted else 0.0


def test_online_score_equals_the_definition_and_survives_a_resume():
    rng = random.Random(0)
    total = 3000
    losses = [5.0 - i * 1e-5 + rng.gauss(0, 0.01) for i in range(total)]
    for i in (400, 1200, 1201, 2500):  # spikes
        losses[i] += 1.0
    losses[700] = float("nan")  # a skipped step
    online = SpikeScore(total)
    for loss in losses[:1500]:
        online.update(loss)
    resumed = SpikeScore(total)  # a resume from a checkpoint at step 1500
    resumed.load_state_dict(online.state_dict())
    assert len(online.state_dict()["losses"]) == 1000  # bounded
    for loss in losses[1500:]:
        resumed.update(loss)
    expected = offline_spike_score(losses, total)
    assert expected > 0 and resumed.score() == expected
    legacy = SpikeScore(total)  # a checkpoint of an earlier version: the whole history
    legacy.load_state_dict({"losses": losses[:1500]})
    for loss in losses[1500:]:
        legacy.update(loss)
    assert legacy.score() == expected
