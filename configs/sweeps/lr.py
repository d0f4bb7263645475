"""Learning rate x warmup on the default config: 4 x 2 = 8 trials.

    python sweep.py --config=configs/default.py --sweep=configs/sweeps/lr.py --workdir=/tmp/lr

A random search over the same space would be
`random_sample({"optimizer.learning_rate": log_uniform(5e-4, 1e-2),
"optimizer.warmup_steps": [10, 30]}, num_trials=8, seed=0)`.
"""

from configs.sweeps import grid, log_grid


def get_sweep():
    return grid(
        {
            "optimizer.learning_rate": log_grid(1e-3, 8e-3, 4),
            "optimizer.warmup_steps": [10, 30],
        }
    )
