"""Start-up validation of a whole config: one clear message per mistake, naming the field."""

from data import config as data_config
from errors import UserError
from model.config import ModelConfig
from sharding.mesh import MESH_AXES, resolve_mesh_shape


def validate_config(config, num_devices: int, process_count: int = 1) -> ModelConfig:
    """Checks everything that can be checked before compiling; returns the ModelConfig."""
    model_config = ModelConfig.from_dict(config.model)
    data_config.validate(config.data)
    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(config.mesh, num_devices)))
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]

    train = config.train
    batch, micro = train.global_batch_size, train.num_microbatches
    if batch <= 0 or micro <= 0 or train.num_steps <= 0:
        raise UserError(
            f"train.global_batch_size={batch}, train.num_microbatches={micro} and "
            f"train.num_steps={train.num_steps} must all be positive."
        )
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
    if config.data.seq_len > model_config.max_seq_len:
        raise UserError(
            f"data.seq_len={config.data.seq_len} is longer than "
            f"model.max_seq_len={model_config.max_seq_len}."
        )
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
        f"width={model_config.embed_dim} heads={model_config.num_heads}/{model_config.kv_heads}"
    )
