"""The training sections of a config, and start-up validation of a whole config.

`validate_config` checks every field of every section (each section's dataclass
declares its fields' defaults, allowed values and meaning; see config_schema.py)
and then the relations between sections, before anything is compiled or written.
"""

import dataclasses

from config_schema import check_fields, field, from_values
from data.config import DataConfig
from errors import UserError
from evaluation.config import EvalConfig
from model.config import ModelConfig
from model.lora import LoraConfig
from sharding.mesh import MESH_AXES, MeshConfig, resolve_mesh_shape
from sharding.rules import logical_rules
from training import distill

POSITIVE, NON_NEGATIVE = "[1, inf)", "[0, inf)"
SCHEDULES = ("cosine", "linear", "constant")


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
    skip_nonfinite_updates: bool = field(
        False, bool, "skip updates with a NaN/inf loss instead of stopping the run"
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

    def __post_init__(self):
        check_fields(self, "train")


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
}


def validate_config(config, num_devices: int, process_count: int = 1) -> ModelConfig:
    """Checks everything that can be checked before compiling; returns the ModelConfig."""
    top_level = {k: v for k, v in config.items() if k not in SECTIONS}
    from_values(RunConfig, top_level, "config")
    checked = {name: from_values(cls, config[name], name) for name, cls in SECTIONS.items()}
    model_config, data = checked["model"], checked["data"]
    logical_rules(config.sharding_rules)
    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(config.mesh, num_devices)))
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]

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
            f"mesh.data*mesh.fsdp={data_parallel}."
        )
    if batch % process_count:
        raise UserError(
            f"train.global_batch_size={batch} is not divisible by the {process_count} processes."
        )
    if data_parallel % process_count:
        raise UserError(
            f"mesh.data*mesh.fsdp={data_parallel} does not split over the {process_count} "
            "processes: each process feeds only its rows of the batch, so the batch-sharding "
            "axes must be a multiple of the process count (move devices from mesh.tensor to "
            "mesh.fsdp or mesh.data)."
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
    distill.check(config, model_config)
    return model_config


def tokens_per_step(config) -> int:
    return config.train.global_batch_size * config.data.seq_len


def describe(config, model_config: ModelConfig, num_params: int, num_devices: int) -> str:
    """Derived values, printed at start-up so nobody computes them by hand."""
    tokens = tokens_per_step(config)
    mesh = resolve_mesh_shape(config.mesh, num_devices)
    microbatch = config.train.global_batch_size // config.train.num_microbatches
    return (
        f"params={num_params / 1e6:.2f}M  mesh(data,fsdp,tensor)={mesh}  "
        f"tokens/step={tokens:,}  microbatch={microbatch}"
        f"  steps={config.train.num_steps:,}  total tokens={tokens * config.train.num_steps:,}  "
        f"warmup={config.optimizer.warmup_steps}  layers={model_config.num_layers} "
        f"width={model_config.embed_dim} heads={model_config.num_heads}/{model_config.num_kv_heads}"
    )
