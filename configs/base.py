"""Every field of a meshlm config, with defaults. Presets start here and change a few.

Any field can be overridden from the command line, e.g.
`python train.py --config=configs/default.py --config.model.num_layers=12`.
"""

import dataclasses

import ml_collections

from data.config import default_data_config
from model.config import ModelConfig


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
    config.data = default_data_config()

    # Device mesh (data, fsdp, tensor); -1 = all remaining devices. Parallelism
    # changes here, never in the model. sharding_rules overrides entries of
    # sharding/rules.py's table, e.g. "vocab=,embed=fsdp".
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding_rules = ""

    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-4,  # peak
            schedule="cosine",  # cosine | linear | constant (after warmup)
            warmup_steps=100,
            final_lr_fraction=0.1,  # the decay's floor, as a fraction of the peak
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            decay_embeddings=False,
            grad_clip_norm=1.0,  # 0 = no clipping
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            global_batch_size=32,  # sequences per optimizer step, over all hosts
            num_microbatches=1,  # gradient accumulation; 1 optimizer update per global batch
            z_loss_weight=0.0,
            skip_nonfinite_updates=False,  # False: a NaN/inf loss stops the run
            log_every=10,
            eval_every=200,  # 0 = only at the end
        )
    )

    config.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=200,  # 0 = only at the end
            keep=3,
            async_save=True,
        )
    )

    # Capture a jax.profiler trace of steps [start_step, start_step + num_steps).
    config.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))  # 0 = off
    return config
