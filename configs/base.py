"""The base config: every section with its defaults. Presets start here and change a few.

Each section's fields, allowed values and meaning are declared once, on the
dataclass that checks them:

    seed, sharding_rules   training/config.py   RunConfig
    model                  model/config.py      ModelConfig
    data                   data/config.py       DataConfig
    mesh                   sharding/mesh.py     MeshConfig
    optimizer, train, checkpoint, profile       training/config.py
    eval                   evaluation/config.py EvalConfig
    lora                   model/lora.py        LoraConfig
    distill                training/distill.py  DistillConfig

`python -m configs.base` prints every field with its default, allowed values and
meaning. Override any field from the command line, e.g.
`python train.py --config=configs/default.py --config.model.num_layers=12`.
"""

import ml_collections

from config_schema import defaults, specs
from training.config import SECTIONS, RunConfig


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(defaults(RunConfig))
    for name, cls in SECTIONS.items():
        config[name] = ml_collections.ConfigDict(defaults(cls))
    return config


def field_table() -> list[tuple[str, object, str, str]]:
    """(name, default, allowed values, meaning) of every field of the base config."""
    rows = []
    for prefix, cls in [("", RunConfig), *((f"{n}.", c) for n, c in SECTIONS.items())]:
        values = defaults(cls)
        for name, spec in specs(cls).items():
            rows.append((prefix + name, values[name], spec.describe(), spec.doc))
    return rows


if __name__ == "__main__":
    for name, default, allowed, doc in field_table():
        print(f"{name:34s} {default!r:14s} {allowed:26s} {doc}")
