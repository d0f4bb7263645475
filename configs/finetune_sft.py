"""Supervised fine-tuning of a trained or imported model on a JSONL file of examples.

The part after ':' is the workdir whose newest checkpoint the run starts from
(train.init_from): the model section and tokenizer are taken from its config.json,
so they fit its params. Import a Hugging Face model, fine-tune, sample:

    python tools/import_hf.py /path/to/hf_model --workdir=/tmp/base
    python train.py --config=configs/finetune_sft.py:/tmp/base --workdir=/tmp/sft \\
        --config.data.sft_file=train.jsonl --config.data.sft_eval_file=valid.jsonl
    python sample.py --workdir=/tmp/sft --prompt="User: Hi there
    Assistant: " --temperature=0

Each JSONL line is {"prompt": ..., "response": ...} or {"messages": [{"role",
"content"}, ...]}; only the response tokens are learned. The template is the
model's own chat template when its tokenizer has one (data.sft_template=hf), else
"User: ...\\nAssistant: ..." (plain). Against pre-training: a 10x lower peak
learning rate, a short warmup, no weight decay. docs/FINETUNING.md has the rest.
"""

import os

from configs import json_file
from configs.base import get_base_config
from data.hf_tokenizer import chat_template, read_tokenizer_config


def get_config(init_from: str):
    initial = json_file.get_config(os.path.join(init_from, "config.json"))
    config = get_base_config()
    config.model.update(initial.model.to_dict())
    tokenizer = initial.data.tokenizer
    has_chat_template = tokenizer.endswith(".json") and bool(
        chat_template(read_tokenizer_config(tokenizer))
    )
    config.data.update(
        source="sft",
        tokenizer=tokenizer,
        sft_template="hf" if has_chat_template else "plain",
        seq_len=min(512, config.model.max_seq_len),
        eval_max_batches=20,
    )
    config.train.update(
        init_from=init_from, num_steps=500, global_batch_size=32, log_every=10, eval_every=100
    )
    config.checkpoint.every_steps = 100
    config.optimizer.update(learning_rate=3e-5, warmup_steps=20, weight_decay=0.0)
    return config
