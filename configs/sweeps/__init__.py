"""Building blocks for sweep files (`configs/sweeps/*.py`, each with `get_sweep()`).

A sweep is a list of trials; a trial is a dict of config overrides such as
`{"optimizer.learning_rate": 1e-3}`, applied to the base config like
`--config.optimizer.learning_rate=1e-3` on train.py's command line.
"""

import itertools
import math
import random


def grid(axes: dict) -> list[dict]:
    """The cartesian product of `{field: [values]}`, in the order given."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def log_grid(low: float, high: float, num: int) -> list[float]:
    """`num` values from `low` to `high`, evenly spaced in log scale (rates), 3 significant digits."""
    step = (math.log(high) - math.log(low)) / max(num - 1, 1)
    return [_round(math.exp(math.log(low) + i * step)) for i in range(num)]


def log_uniform(low: float, high: float):
    """A range sampled evenly in log scale, for `random_sample`: rates, weight decay."""
    return lambda rng: _round(math.exp(rng.uniform(math.log(low), math.log(high))))


def uniform(low: float, high: float):
    """A range sampled evenly, for `random_sample`."""
    return lambda rng: _round(rng.uniform(low, high))


def random_sample(space: dict, num_trials: int, seed: int = 0) -> list[dict]:
    """`num_trials` draws from `{field: list (one of its values) | log_uniform | uniform}`.

    Seeded, so a sweep file gives the same trials every time it is read: a rerun
    finds, skips and resumes the same trial directories.
    """
    rng = random.Random(seed)
    draw = {k: (v if callable(v) else (lambda r, v=v: r.choice(v))) for k, v in space.items()}
    return [{k: sample(rng) for k, sample in draw.items()} for _ in range(num_trials)]


def _round(value: float) -> float:
    """3 significant digits, so a trial's directory name shows its exact value."""
    return float(f"{value:.3g}")
