"""A mixture of experts of about 30.5B parameters, 3.3B active per token (the shape of
Qwen3-30B-A3B, so tools/import_hf.py and tools/export_hf.py convert it as
Qwen3MoeForCausalLM).

    python train.py --config=configs/qwen3_30b_a3b.py --workdir=gs://... \
        --config.mesh.expert=8 --config.mesh.fsdp=-1

48 layers, every one MoE: 128 SwiGLU experts of width 768, each token routed to 8
(softmax, the top 8 renormalised: norm_topk_prob), no shared expert; grouped-query
attention (32 query heads of 128, 4 KV heads) with per-head q/k RMSNorm; RoPE theta
1M, untied embeddings, 4096-token context. Full-layer remat, blockwise attention, a
chunked loss. The experts are split over mesh.expert (default 8) and the rest of the
parameters over fsdp.

Memory, by `--dry_run` on 64 simulated CPU devices (mesh expert=8, fsdp=8) at the global
batch below (256 x 4096 tokens, num_microbatches=1, 16,384 tokens per device), 2026-12-05:
2.40 GiB parameters per device (1.69 GiB of them experts), 4.80 GiB AdamW moments and
19.83 GiB of temporaries (4.02 GiB saved for the backward pass), 27.04 GiB in all, with
the capacity dispatch below (each device dispatches its own tokens and exchanges them with
its expert group by all-to-all: 163,840 rows per buffer and layer). It was 258 GiB of
temporaries when every device dispatched the whole batch. Dropless (moe_dispatch=
"dropless") exchanges a fixed worst-case block, 8x the routed rows here (1,048,576 per
layer), and XLA:CPU's ragged_dot is a dense masked matmul over the 16 local experts:
607 GiB of temporaries on CPU (2,730 GiB before); docs/MOE.md, "Dispatch".
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.model.update(
        vocab_size=151936,
        num_layers=48,
        embed_dim=2048,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        mlp_dim=6144,  # Qwen3-MoE's dense width (intermediate_size); unused: every layer is MoE
        num_experts=128,
        experts_per_token=8,
        moe_mlp_dim=768,
        router_norm="softmax_topk_renorm",
        moe_dispatch="capacity",  # dropless's fixed-size exchange is 8x larger here (docstring)
        capacity_factor=1.25,
        max_seq_len=4096,
        position_embedding="rope",
        rope_theta=1e6,
        norm="rmsnorm",
        norm_eps=1e-6,
        qk_norm=True,
        mlp_activation="swiglu",
        use_bias=False,
        tie_embeddings=False,
        dtype="bfloat16",
        remat_policy="full",
        attention_implementation="blockwise",
        loss_chunk_size=256,
    )
    config.data.seq_len = 4096
    config.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    config.train.update(
        num_steps=50000,
        global_batch_size=256,
        eval_every=2000,
        z_loss_weight=1e-4,
        load_balance_weight=0.001,  # Qwen3-MoE's router_aux_loss_coef
        router_z_loss_weight=0.001,
    )
    config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1)
    config.checkpoint.every_steps = 1000
    return config
