"""Everything a run needs, built once from a validated config.

train.py, `--dry_run` and the benchmarks all start here, so they measure and
run exactly the same mesh, shardings and jitted step.
"""

import time

import jax
import numpy as np

from data.batch import batch_spec
from data.config import encoder_length
from model import Transformer
from model import pipeline
from model.flops import count_params, train_flops_per_token
from model.lora import LoraConfig, is_lora_tree, merged_params, trainable
from sharding import activate, batch_sharding, logical_rules, make_mesh
from training.config import validate_config
from training.distill import Teacher
from training.distributed import feed_position
from training.loss_scale import from_config as loss_scale_from_config
from training.loss_scale import resumed as resumed_loss_scale
from training.memory import breakdown, check_fits
from training.optimizer import make_optimizer
from training.state import TrainState, init_train_state, state_shardings
from training.step import make_train_step


def _with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def memory_report(compiled) -> dict:
    """Per-device bytes of a compiled step.

    `per_device_bytes` is the upper bound arguments + outputs - donated buffers +
    temporaries (what must fit); XLA's own peak estimate is added where the backend
    gives one (on CPU it can be lower than the temporaries alone, so it is not used
    for the fit).
    """
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    estimate = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    report = {
        "per_device_bytes": int(estimate),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
    }
    if getattr(memory, "peak_memory_in_bytes", 0):
        report["xla_peak_bytes"] = int(memory.peak_memory_in_bytes)
    return report


class Trainer:
    """Model, mesh, rules, optimizer, abstract sharded state and the jitted train step."""

    def __init__(self, config, devices=None):
        """`devices`: the mesh's devices (default: all), e.g. one device for a reference run."""
        self.config = config
        devices = jax.devices() if devices is None else devices
        self.model_config = validate_config(config, len(devices), jax.process_count())
        self.loss_scale = loss_scale_from_config(config, self.model_config)  # None: off
        self.mesh = make_mesh(config.mesh, devices)
        self.rules = logical_rules(config.sharding_rules)
        self.tx, self.schedule = make_optimizer(config.optimizer, config.train.num_steps)
        self.seq_len = config.data.seq_len
        # An encoder-decoder's encoder row length; 0: decoder-only, no encoder fields.
        self.encoder_seq_len = encoder_length(config.data, self.model_config.encoder_layers)
        self.lora = LoraConfig(**config.lora) if config.lora.rank else None
        self.model = Transformer(
            self.model_config,
            self.lora.dropout if self.lora else 0.0,
            pipeline.schedule(config, self.mesh.shape["stage"]),
        )
        # Distillation: the teacher's model and abstract params (its arrays: `teacher_step`).
        self.teacher = None
        if config.distill.teacher:
            self.teacher = Teacher(config.distill, self.mesh, self.rules)
        abstract, self.shardings = state_shardings(
            self.model, self.tx, self.mesh, self.rules, self.seq_len, self.lora, self.loss_scale
        )
        self.abstract_state = _with_shardings(abstract, self.shardings)
        self.batch_sharding = batch_sharding(self.mesh, self.rules)
        # The part of the batch this process feeds (processes along mesh.stage feed the same).
        self.feed_index, self.feed_count = feed_position(
            self.batch_sharding, config.train.global_batch_size
        )
        self.train_step = make_train_step(
            self.model,
            self.tx,
            self.schedule,
            self.mesh,
            self.rules,
            self.shardings,
            num_microbatches=config.train.num_microbatches,
            z_loss_weight=config.train.z_loss_weight,
            skip_nonfinite_updates=config.train.skip_nonfinite_updates,
            seed=config.seed,
            lora_config=self.lora,
            teacher=self.teacher,
            loss_scale=self.loss_scale,
            moe_weights=(config.train.load_balance_weight, config.train.router_z_loss_weight),
        )
        # The model's own params: with LoRA, the frozen base (model/lora.py).
        self.abstract_model_params = _with_shardings(abstract, self.shardings).params
        self.model_shardings = self.shardings.params
        if self.lora:
            self.abstract_model_params = self.abstract_model_params["base"]
            self.model_shardings = self.shardings.params["base"]
            self._merge = jax.jit(
                lambda p: merged_params(p["base"], p["lora"], self.lora),
                out_shardings=self.model_shardings,
            )
        self.num_params = count_params(self.abstract_model_params)
        self.num_trainable_params = count_params(trainable(abstract.params))
        self.flops_per_token = train_flops_per_token(
            self.model_config,
            self.abstract_model_params,
            self.seq_len,
            adapters=abstract.params["lora"] if self.lora else None,
        )

    def init_state(self) -> TrainState:
        """A fresh train state from the config's seed, allocated shard by shard."""
        return init_train_state(
            self.model,
            self.tx,
            self.mesh,
            self.rules,
            self.shardings,
            self.config.seed,
            self.seq_len,
            self.lora,
            self.loss_scale,
        )

    def resumed_state(self, restored) -> TrainState:
        """The train state of a restored checkpoint; a fresh optimizer state if it had none,
        and fresh adapters for a LoRA run whose params are a base model's (train.init_from)."""
        params, opt_state = restored.params, restored.opt_state
        if self.lora and not is_lora_tree(params):
            params = {"base": params, "lora": self.init_state().params["lora"]}
        if opt_state is None:
            init = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)
            with activate(self.mesh, self.rules):
                opt_state = init(trainable(params))
        step = jax.device_put(np.int32(restored.step), self.shardings.step)
        scale = resumed_loss_scale(self.loss_scale, restored.loss_scale, restored.step)
        scale = None if scale is None else jax.device_put(scale, self.shardings.loss_scale)
        return TrainState(step=step, params=params, opt_state=opt_state, loss_scale=scale)

    def model_params(self, params):
        """The params the model runs on (eval, sampling): with LoRA, base and adapters merged."""
        if not self.lora:
            return params
        with activate(self.mesh, self.rules):
            return self._merge(params)

    def abstract_batch(self) -> dict:
        """The global batch's shapes, dtypes and sharding (data/batch.py)."""
        return batch_spec(
            self.config.train.global_batch_size,
            self.seq_len,
            self.batch_sharding,
            self.encoder_seq_len,
        )

    def to_global(self, local_batch: dict) -> dict:
        """This process's numpy rows -> global arrays sharded over the mesh. Every process
        feeds as many rows; the global shape is explicit, not inferred from the mesh. One
        call for the whole batch: on one process, one transfer for every array (~0.3 ms of
        host time per baby-GPT batch instead of ~0.6 ms; the loop overlaps it with a step)."""
        shapes = {k: (v.shape[0] * self.feed_count, *v.shape[1:]) for k, v in local_batch.items()}
        return jax.make_array_from_process_local_data(self.batch_sharding, local_batch, shapes)

    def compile(self):
        """(compiled train step, seconds): compiled from shapes alone, allocating nothing."""
        start = time.perf_counter()
        args = (self.abstract_state, self.abstract_batch())
        if self.teacher:
            args += (self.teacher.abstract_params,)
        with activate(self.mesh, self.rules):
            compiled = self.train_step.jitted.lower(*args).compile()
        return compiled, time.perf_counter() - start

    def teacher_step(self, train_step):
        """`train_step(state, batch)`: the compiled step of a distillation run given the
        teacher's params, read now (and again whenever a run starts or resumes)."""
        if not self.teacher:
            return train_step
        teacher_params = self.teacher.load()
        return lambda state, batch: train_step(state, batch, teacher_params)

    def checked_train_step(self):
        """The train step, compiled now and refused (a UserError naming both sizes and the
        knobs) if it needs more memory than a device has, before anything is allocated. The
        loop runs this executable, so the check costs no second compile."""
        compiled, _ = self.compile()
        check_fits(memory_report(compiled).get("per_device_bytes", 0), jax.local_devices()[0])
        return compiled

    def dry_run(self) -> dict:
        """Parameter count, FLOPs/token, compile time and per-device memory of the step:
        totals, parameters, optimizer state, batch and the largest arrays (training/memory.py)."""
        compiled, seconds = self.compile()
        report = {
            "num_params": self.num_params,
            "num_trainable_params": self.num_trainable_params,
            "flops_per_token": self.flops_per_token,
            "compile_seconds": seconds,
        }
        report.update(memory_report(compiled))
        report.update(breakdown(self, compiled))
        return report
