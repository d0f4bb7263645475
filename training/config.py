"""The training sections of a config, and start-up validation of a whole config.

`validate_config` checks every field of every section (each section's dataclass
declares its fields' defaults, allowed values and meaning; see config_schema.py)
and then the relations between sections, before anything is compiled or written.
"""

import dataclasses

from config_schema import check_fields, field, from_values
from data import mixture, objectives
from data.config import DataConfig, encoder_length
from errors import UserError
from evaluation.config import EvalConfig
from model.config import ModelConfig
from model import pipeline
from model.lora import LoraConfig
from sharding.mesh import MESH_AXES, MeshConfig, resolve_mesh_shape
from sharding.rules import logical_rules
from training import distill, loss_scale, metrics

POSITIVE, NON_NEGATIVE = "[1, inf)", "[0, inf)"
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The top-level fields of a config."""

    seed: int = field(0, "[0, 4294967295]", "seeds init, data order and dropout")
    sharding_rules: str = field(
        "", str, "overrides of sharding/rules.py, e.g. 'vocab=,embed=fsdp' ('' = none)"
    )

    def __post_init__(self):
        check_fields(self, "config")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = field(
        "adamw",
        OPTIMIZERS,
        "adamw; or muon: orthogonalised momentum for the matmul kernels, AdamW (b1, b2, eps, "
        "weight_decay) for embeddings, output head, norms and biases (training/optimizer.py)",
    )
    learning_rate: float = field(3e-4, "(0, inf)", "peak learning rate")
    schedule: str = field("cosine", SCHEDULES, "decay after warmup")
    warmup_steps: int = field(100, NON_NEGATIVE, "linear warmup from 0; <= train.num_steps")
    final_lr_fraction: float = field(0.1, "[0, 1]", "the decay's floor, as a fraction of the peak")
    b1: float = field(0.9, "[0, 1)", "Adam's first-moment decay")
    b2: float = field(0.95, "[0, 1)", "Adam's second-moment decay")
    eps: float = field(1e-8, "(0, inf)", "Adam's epsilon")
    weight_decay: float = field(0.1, NON_NEGATIVE, "AdamW decoupled weight decay (matmul kernels)")
    decay_embeddings: bool = field(False, bool, "apply weight decay to the embeddings too")
    grad_clip_norm: float = field(1.0, NON_NEGATIVE, "clip the global gradient norm; 0 = off")
    muon_beta: float = field(0.95, "[0, 1)", "Muon's momentum decay")
    muon_nesterov: bool = field(True, bool, "Muon: Nesterov momentum")
    muon_ns_steps: int = field(5, POSITIVE, "Muon: Newton-Schulz iterations per update")
    muon_weight_decay: float = field(
        0.1, NON_NEGATIVE, "decoupled weight decay of the Muon kernels (times the rate)"
    )
    keep_sparsity: bool = field(
        False,
        bool,
        "weights (kernels, embeddings) exactly zero when training starts, e.g. those of a "
        "compress.py-pruned train.init_from, stay exactly zero: their updates are masked after "
        "every optimizer update; the masks are optimizer state (checkpointed, restored on "
        "resume) and cost one byte per weight",
    )

    def __post_init__(self):
        check_fields(self, "optimizer")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = field(1000, POSITIVE, "optimizer steps in the whole run")
    global_batch_size: int = field(32, POSITIVE, "sequences per optimizer step, over all hosts")
    num_microbatches: int = field(1, POSITIVE, "gradient accumulation: microbatches per step")
    z_loss_weight: float = field(0.0, NON_NEGATIVE, "weight of PaLM's z-loss (log Z)^2")
    load_balance_weight: float = field(
        0.01, NON_NEGATIVE, "MoE: weight of the Switch load-balancing loss (global batch)"
    )
    router_z_loss_weight: float = field(
        0.001, NON_NEGATIVE, "MoE: weight of the router z-loss, mean (logsumexp of logits)^2"
    )
    skip_nonfinite_updates: bool = field(
        False, bool, "skip updates with a NaN/inf loss instead of stopping the run"
    )
    objective: str = field(
        "clm",
        objectives.OBJECTIVES,
        "what the model learns (data/objectives.py): clm (next token; model.attention_mask="
        "causal), mlm (masked tokens; bidirectional), prefix_lm (the rest of each document "
        "after a bidirectional prefix; prefix) or span_corruption (T5's denoising as a prefix "
        "LM; prefix; with model.encoder_layers > 0 T5's encoder-decoder form, the only "
        "objective of an encoder-decoder; causal); mlm and span_corruption need a tokenizer "
        "with reserved ids (`python -m data.tokenizer --extra_ids=100`)",
    )
    mlm_mask_rate: float = field(0.15, "(0, 1)", "mlm: share of the tokens masked (BERT 0.15)")
    mlm_mask_token: float = field(
        0.8, "[0, 1]", "mlm: share of the masked tokens replaced by <mask>"
    )
    mlm_random_token: float = field(
        0.1, "[0, 1]", "mlm: share of the masked tokens replaced by a random token; the rest stay"
    )
    prefix_length: str = field(
        "uniform",
        ("uniform", "fixed"),
        "prefix_lm: each document's prefix is a uniform random length in [1, length-1], or "
        "train.prefix_fraction of it",
    )
    prefix_fraction: float = field(0.5, "(0, 1)", "prefix_lm, prefix_length=fixed: prefix share")
    span_noise_density: float = field(
        0.15, "(0, 1)", "span_corruption: share of each document's tokens in noise spans"
    )
    span_mean_length: float = field(
        3.0, "[1, inf)", "span_corruption: mean noise span length in tokens"
    )
    loss_scale: str = field(
        "auto",
        str,
        "float16 loss scaling (training/loss_scale.py): auto (= dynamic with model.dtype="
        "float16, else none) | dynamic (flax DynamicScale's rule: 2^16, x0.5 on overflow, x2 on "
        "the finite step after loss_scale_growth_interval finite ones) | static:<S> | none; "
        "refused with bfloat16/float32 compute and with model.param_dtype other than float32. "
        "A step whose scaled gradients overflow is skipped (params, optimizer state unchanged) "
        "but counts as a step: the learning-rate schedule and the data advance",
    )
    loss_scale_growth_interval: int = field(
        2000, POSITIVE, "dynamic loss scale: finite steps in a row before the next doubles it"
    )
    log_every: int = field(10, POSITIVE, "steps between progress lines and metrics records")
    eval_every: int = field(200, NON_NEGATIVE, "steps between evaluations; 0 = only at the end")
    init_from: str = field(
        "",
        str,
        "a workdir (a run's, or tools/import_hf.py's) whose params start this run when its own "
        "workdir has no checkpoint yet; fresh optimizer and step; '' = random init",
    )
    init_step: int = field(-1, "{-1} | [0, inf)", "train.init_from's step; -1 = its newest")
    trackers: str = field(
        "tensorboard",
        str,
        "where metrics go besides metrics.jsonl (always written): comma-separated tensorboard, "
        "wandb ('' = none); wandb needs `pip install wandb`; a tracker that fails is dropped "
        "with a warning and the run goes on",
    )
    tracker_project: str = field(
        "meshlm", str, "the W&B project of train.trackers=wandb; '' = W&B's (WANDB_PROJECT)"
    )
    run_name: str = field("", str, "the run's name in W&B; '' = the workdir's name")

    def __post_init__(self):
        check_fields(self, "train")
        metrics.parse_trackers(self.trackers)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = field(200, NON_NEGATIVE, "steps between checkpoints; 0 = only at the end")
    keep: int = field(3, POSITIVE, "newest checkpoints kept")
    async_save: bool = field(True, bool, "write checkpoints in the background")
    allow_optimizer_reset: bool = field(
        False,
        bool,
        "when the newest checkpoint's optimizer state does not fit the current optimizer "
        "config, resume its params, step and data position with a fresh optimizer state "
        "instead of stopping",
    )

    def __post_init__(self):
        check_fields(self, "checkpoint")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    start_step: int = field(0, NON_NEGATIVE, "first step traced by jax.profiler; 0 = off")
    num_steps: int = field(3, POSITIVE, "steps traced")

    def __post_init__(self):
        check_fields(self, "profile")


# Every section of a config and the dataclass that declares and checks its fields.
SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "profile": ProfileConfig,
    "eval": EvalConfig,
    "lora": LoraConfig,
    "distill": distill.DistillConfig,
    "pipeline": pipeline.PipelineConfig,
}


def validate_config(config, num_devices: int, process_count: int = 1) -> ModelConfig:
    """Checks everything that can be checked before compiling; returns the ModelConfig."""
    top_level = {k: v for k, v in config.items() if k not in SECTIONS}
    from_values(RunConfig, top_level, "config")
    checked = {name: from_values(cls, config[name], name) for name, cls in SECTIONS.items()}
    model_config, data = checked["model"], checked["data"]
    if data.mixture:  # each source checked as a data section of its own (data/mixture.py)
        mixture.source_configs(data)
    logical_rules(config.sharding_rules)
    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(config.mesh, num_devices)))
    # The batch is split over these axes, never over mesh.stage (each stage sees every row).
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"]
    batch_axes = "mesh.data*mesh.fsdp" + ("*mesh.expert" if mesh_shape["expert"] > 1 else "")

    train = config.train
    batch, micro = train.global_batch_size, train.num_microbatches
    if batch % micro:
        raise UserError(
            f"train.global_batch_size={batch} is not divisible by train.num_microbatches={micro}."
        )
    per_micro = batch // micro
    if per_micro % data_parallel:
        raise UserError(
            f"train.global_batch_size={batch} / train.num_microbatches={micro} = {per_micro} "
            f"sequences per microbatch is not divisible by the data-parallel size "
            f"{batch_axes}={data_parallel}."
        )
    if (mesh_shape["stage"] * data_parallel) % process_count:  # finer: distributed.feed_position
        raise UserError(
            f"mesh.stage x {batch_axes}={mesh_shape['stage'] * data_parallel} does not split over "
            f"the {process_count} processes: each process feeds only its rows of the batch (the "
            "same rows as the processes beside it along mesh.stage), so these axes must be a "
            "multiple of the process count (move devices from mesh.tensor to mesh.fsdp, "
            "mesh.data or mesh.stage)."
        )
    if config.optimizer.warmup_steps > train.num_steps:
        raise UserError(
            f"optimizer.warmup_steps={config.optimizer.warmup_steps} is longer than "
            f"train.num_steps={train.num_steps}."
        )
    if data.seq_len > model_config.max_seq_len:
        raise UserError(
            f"data.seq_len={data.seq_len} is longer than "
            f"model.max_seq_len={model_config.max_seq_len}."
        )
    if model_config.quantization != "none":
        raise UserError(
            f"model.quantization={model_config.quantization!r}: quantized weights are for "
            "inference (sample.py, eval.py, tools/export_hf.py) and do not train; fine-tune the "
            "unquantized run and quantize it afterwards with compress.py."
        )
    lora_rank = config.lora.rank
    if lora_rank and config.optimizer.keep_sparsity:
        raise UserError(
            f"optimizer.keep_sparsity with lora.rank={lora_rank}: LoRA adapters add dense updates "
            "to every kernel, so pruned weights would not stay zero; fine-tune without LoRA "
            "(lora.rank=0)."
        )
    if lora_rank and model_config.low_rank_ratio:
        raise UserError(
            f"lora.rank={lora_rank} with model.low_rank_ratio={model_config.low_rank_ratio}: "
            "LoRA adapts full kernels; fine-tune a factorized run without LoRA (lora.rank=0)."
        )
    if lora_rank and model_config.encoder_layers:
        raise UserError(
            f"lora.rank={lora_rank} with model.encoder_layers={model_config.encoder_layers}: "
            "LoRA adapts the decoder's self-attention and MLP only, not the encoder or the "
            "cross-attention; fine-tune an encoder-decoder fully (lora.rank=0)."
        )
    _check_moe(config, model_config, mesh_shape["expert"])
    objectives.check_config(config, model_config)
    distill.check(config, model_config)
    pipeline.check(config, model_config, mesh_shape)
    loss_scale.from_config(config, model_config)  # refuses what it cannot scale
    return model_config


def _check_moe(config, model_config: ModelConfig, expert_axis: int) -> None:
    """MoE refusals that need the mesh or the LoRA config."""
    experts = model_config.num_experts
    if experts % expert_axis:
        raise UserError(
            f"mesh.expert={expert_axis} does not divide model.num_experts={experts}; "
            "give a divisor (experts are split evenly over the expert axis)."
        )
    if experts and config.lora.rank and model_config.moe_every > 1:
        raise UserError(
            f"lora.rank={config.lora.rank} with model.moe_every={model_config.moe_every}: LoRA "
            "finds layers/attn only when every layer is MoE (model.moe_every=1)."
        )
    if experts and config.lora.rank and "mlp" in config.lora.targets:
        raise UserError(
            f"lora.targets={config.lora.targets!r}: the experts of an MoE model are not "
            "adaptable; target the attention (query, key, value, out)."
        )


def tokens_per_step(config) -> int:
    return config.train.global_batch_size * config.data.seq_len


def describe(config, model_config: ModelConfig, num_params: int, num_devices: int) -> str:
    """Derived values, printed at start-up so nobody computes them by hand."""
    tokens = tokens_per_step(config)
    mesh = ",".join(map(str, resolve_mesh_shape(config.mesh, num_devices)))
    microbatch = config.train.global_batch_size // config.train.num_microbatches
    bubble = pipeline.bubble_fraction(config, num_devices)
    bubble = f"  pipeline bubble={bubble:.1%}" if bubble else ""
    layers = str(model_config.num_layers)
    if model_config.encoder_layers:  # an encoder-decoder: its tokens/step are the decoder's
        encoder_len = encoder_length(config.data, model_config.encoder_layers)
        layers = f"{model_config.encoder_layers}+{layers} (encoder+decoder, {encoder_len}+"
        layers += f"{config.data.seq_len} tokens/row)"
    return (
        f"params={num_params / 1e6:.2f}M  mesh({','.join(MESH_AXES)})=({mesh})  "
        f"tokens/step={tokens:,}  microbatch={microbatch}{bubble}"
        f"  steps={config.train.num_steps:,}  total tokens={tokens * config.train.num_steps:,}  "
        f"warmup={config.optimizer.warmup_steps}  layers={layers} "
        f"width={model_config.embed_dim} heads={model_config.num_heads}/{model_config.num_kv_heads}"
    )
