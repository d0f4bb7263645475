"""Three peak learning rates, for comparing optimizers each at its own best rate (BENCHMARKS.md,
"Muon vs AdamW"): the optimizer is a base override.

    python sweep.py --config=configs/default.py --sweep=configs/sweeps/optimizer_lr.py \
        --workdir=/tmp/mva/muon --config.optimizer.name=muon --config.train.num_steps=600
"""

from configs.sweeps import log_grid


def get_sweep():
    return [{"optimizer.learning_rate": lr} for lr in log_grid(1e-3, 4e-3, 3)]
