"""A Llama-style model of about 1.2B parameters (the shape of Llama 3.2 1B).

    python train.py --config=configs/llama_1b.py --workdir=gs://... \
        --config.mesh.fsdp=-1 --config.mesh.data=1

RoPE (theta 500k), RMSNorm, SwiGLU, grouped-query attention (32 query heads,
8 KV heads), no biases, tied embeddings, 2048-token context, full-layer remat,
blockwise attention and a loss chunked 256 positions at a time.

Memory, by `--dry_run` on 8 simulated CPU devices (mesh data=1, fsdp=8) at the
global batch below (256 x 2048 tokens) with num_microbatches=1: 29.5 GiB per
device (0.6 GiB params, 1.2 GiB AdamW moments, the rest temporaries). The same
step with the dense reference attention and the full loss needed 79.0 GiB.
On NVIDIA GPUs `attention_implementation=cudnn`, on TPUs `splash`, select the
fused kernels (not yet measured by this project); see docs/MEMORY.md.
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.model.update(
        vocab_size=128256,
        num_layers=16,
        embed_dim=2048,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        max_seq_len=2048,
        position_embedding="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp_activation="swiglu",
        use_bias=False,
        tie_embeddings=True,
        dtype="bfloat16",
        remat_policy="full",
        attention_implementation="blockwise",
        loss_chunk_size=256,
    )
    config.data.seq_len = 2048
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(num_steps=50000, global_batch_size=256, eval_every=2000, z_loss_weight=1e-4)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1)
    config.checkpoint.every_steps = 1000
    return config
