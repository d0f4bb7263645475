"""A workdir's checkpoints on disk, below training/, evaluation/ and tools/ (which all use it).

    layout.py  where steps live, the orbax manager and its items, how they are compared
    read.py    load_run: a run's saved config, step and params (sampling, evaluation,
               export, fine-tuning, and whatever next loads a run); load_sampler
    write.py   save_params: a params-only step (tools/import_hf.py)
    lora.py    a LoRA run's steps: adapters at every step, the frozen base once

The train-state manager (save, restore, resume, compatibility) is training/checkpoint.py.
"""
