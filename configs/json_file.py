"""A config saved as JSON: a workdir's config.json (a run's, or an imported model's).

    python train.py --config=configs/json_file.py:W/config.json --workdir=W --config.train.num_steps=100

The path after ':' names the file; overrides apply on top of it as usual.
"""

import json

import ml_collections

from configs.base import get_base_config


def get_config(path: str) -> ml_collections.ConfigDict:
    """The file's config; a section or field it lacks (added to meshlm after it was written,
    e.g. `eval` or `optimizer.keep_sparsity`) comes from configs/base.py with its default."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        config = get_base_config().to_dict()
        for key, value in saved.items():
            section = config.get(key)
            config[key] = {**section, **value} if isinstance(section, dict) else value
        return ml_collections.ConfigDict(config)
    except (OSError, ValueError) as error:  # read while flags are parsed: no UserError handler yet
        raise SystemExit(
            f"error: --config=configs/json_file.py:{path}: cannot read it ({error})."
        ) from None
