"""GPT-2 small (124M): the GPT-2 architecture at its original size.

    python -m data.prepare --config=configs/gpt2_small.py \
        --config.data.source=tfds --config.data.tfds_name=<dataset> \
        --config.data.tokenizer=<your .model>     # once: the token cache, on all cores
    python train.py --config=configs/gpt2_small.py --workdir=/tmp/gpt2 <the same --config.data flags>

(The first training run prepares a missing cache itself; `--config.data.pipeline=stream`
tokenizes while training instead, for a corpus too large to cache.)

Learned positions, LayerNorm, GELU, biases, tied embeddings, 1024-token
context, batch 0.5M tokens (accumulated over microbatches where memory needs),
AdamW 6e-4 with cosine decay, as in nanoGPT's reproduction. Sized for 8 GPUs
(data=8): blockwise attention, the loss in chunks of 256 positions and 4
microbatches of 128 sequences; `--dry_run` on 8 simulated devices reports 25.3 GiB
per device (186 GiB with dense attention, the full loss and no accumulation).
GPU throughput is not yet measured by this project (BENCHMARKS.md has the command).
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.model.update(
        vocab_size=50304,  # GPT-2's 50257 padded to a multiple of 128
        num_layers=12,
        embed_dim=768,
        num_heads=12,
        mlp_dim=3072,
        max_seq_len=1024,
        position_embedding="learned",
        norm="layernorm",
        mlp_activation="gelu",
        use_bias=True,
        tie_embeddings=True,
        dtype="bfloat16",
        remat_policy="none",
        attention_implementation="blockwise",
        loss_chunk_size=256,
    )
    config.data.seq_len = 1024
    config.train.update(num_steps=19073, global_batch_size=512, num_microbatches=4, eval_every=1000)
    config.optimizer.update(learning_rate=6e-4, warmup_steps=715, weight_decay=0.1)
    config.checkpoint.every_steps = 1000
    return config
