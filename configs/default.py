"""A small code model on the Python standard library: trains on a laptop CPU.

    python train.py --workdir=/tmp/meshlm-default

~6M parameters (4 layers, width 256, 8k BPE vocabulary), 256-token windows of
the interpreter's own stdlib sources, no download. On a 2-core CPU the loss
falls from ~9 to below ~4.5 in the first few hundred steps (see BENCHMARKS.md for
measured step times).
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.model.update(
        vocab_size=8192,
        num_layers=4,
        embed_dim=256,
        num_heads=4,
        mlp_dim=1024,
        max_seq_len=256,
        dtype="float32",  # CPUs have no fast bfloat16 matmul; use bfloat16 on GPU/TPU
        scan_unroll=4,  # unrolled layers run faster on CPU; compile time stays small at 4
    )
    config.data.update(seq_len=128, eval_max_batches=20)
    config.train.update(num_steps=300, global_batch_size=8, log_every=10, eval_every=100)
    config.checkpoint.every_steps = 100
    config.optimizer.update(learning_rate=2e-3, warmup_steps=30)
    return config
