"""A Llama-style model of about 8.0B parameters (the shape of Llama 3 8B).

    python train.py --config=configs/llama_8b.py --workdir=gs://... \
        --config.mesh.fsdp=-1 --config.mesh.data=1

RoPE (theta 500k), RMSNorm, SwiGLU, grouped-query attention (32 query heads,
8 KV heads), no biases, untied embeddings, 8192-token context, full-layer remat,
blockwise attention and a chunked loss.
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.model.update(
        vocab_size=128256,
        num_layers=32,
        embed_dim=4096,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_seq_len=8192,
        position_embedding="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp_activation="swiglu",
        use_bias=False,
        tie_embeddings=False,
        dtype="bfloat16",
        remat_policy="full",
        attention_implementation="blockwise",
        loss_chunk_size=256,
    )
    config.data.seq_len = 8192
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(num_steps=50000, global_batch_size=256, eval_every=2000, z_loss_weight=1e-4)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1)
    config.checkpoint.every_steps = 1000
    return config
