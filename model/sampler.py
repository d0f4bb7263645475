"""A model's parameters on a device mesh, generating with `model.decode.generate`.

    sampler = Sampler(model_config, params, mesh_sizes)    # or load_sampler (checkpoints/read.py)
    new_tokens = sampler.generate(prompts, SamplingConfig(temperature=0.0), eos_id)

The parameters are placed by their logical axis names (sharding/rules.py), so
decoding runs on any mesh: batch over data (and fsdp), heads over tensor. The
prompt batch is padded to a multiple of the data-parallel size and the prompt
width to a multiple of PROMPT_BUCKET, so few shapes are ever compiled.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from config_schema import check_fields, field
from errors import UserError
from model.config import ModelConfig
from model.decode import KV_CACHE_DTYPES, generate, left_pad
from model.transformer import Transformer
from sharding import activate, logical_rules, make_mesh, replicated

PROMPT_BUCKET = 32  # prompts are padded to a multiple of this, so few lengths are compiled


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; the field names are sample.py's flags."""

    max_new_tokens: int = field(64, "[1, inf)", "tokens generated after each prompt")
    temperature: float = field(1.0, "[0, inf)", "softmax temperature; 0 = greedy")
    top_k: int = field(0, "[0, inf)", "sample from the k most likely tokens; 0 = all")
    top_p: float = field(1.0, "(0, 1]", "sample from the smallest set holding this probability")
    seed: int = field(0, "[0, inf)", "random seed of the sampling")
    kv_cache_dtype: str = field(
        "model", KV_CACHE_DTYPES, "KV cache: model (its compute dtype) or int8 (with scales)"
    )

    def __post_init__(self):
        check_fields(self, "sampling")


def abstract_params(model, mesh, rules):
    """The model's params as ShapeDtypeStructs carrying their NamedShardings on `mesh`."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    with activate(mesh, rules):
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )


def parse_mesh(text: str) -> ml_collections.ConfigDict:
    """'-1,1,1' -> config.mesh-style sizes of (data, fsdp, tensor[, expert[, stage]]), the
    optional axes 1 when left out (the order keeps the older three- and four-size forms)."""
    try:
        sizes = [int(x) for x in text.split(",")]
        if len(sizes) not in (3, 4, 5):
            raise ValueError
    except ValueError:
        raise UserError(
            f"--mesh={text!r}: give sizes data,fsdp,tensor[,expert[,stage]], e.g. -1,1,1 or "
            "1,2,1,4 or 1,4,1,1,2."
        ) from None
    axes = ("data", "fsdp", "tensor", "expert", "stage")
    return ml_collections.ConfigDict(dict(zip(axes, sizes)))


class Sampler:
    """A model's parameters on a device mesh and a jitted `generate` per sampling setting."""

    def __init__(
        self, model_config: ModelConfig, params, mesh_sizes, sharding_rules: str = "", devices=None
    ):
        """`params`: host arrays, or arrays already placed on this mesh (left where they are)."""
        self.model_config = model_config
        self.model = Transformer(model_config)
        self.mesh = make_mesh(mesh_sizes, devices)
        self.rules = logical_rules(sharding_rules)
        self.abstract_params = abstract_params(self.model, self.mesh, self.rules)
        shardings = jax.tree.map(lambda a: a.sharding, self.abstract_params)
        self.params = jax.device_put(params, shardings)
        self.batch_multiple = math.prod(self.mesh.shape[a] for a in ("data", "fsdp", "expert"))
        self._compiled = {}

    def check_room(self, prompts: list[list[int]], max_new_tokens: int, truncate: bool):
        """The prompts, cut from the left when `truncate`, that leave room for the new tokens
        (an encoder-decoder's prompts go to the encoder: the whole max_seq_len is theirs)."""
        room = self.model_config.max_seq_len - max_new_tokens
        if room < 1:
            raise UserError(
                f"--max_new_tokens={max_new_tokens}: the model's max_seq_len is "
                f"{self.model_config.max_seq_len}; ask for fewer new tokens."
            )
        if self.model_config.encoder_layers:
            room = self.model_config.max_seq_len
        for number, prompt in enumerate(prompts, 1):
            if not prompt:
                raise UserError(f"prompt {number} is empty: give at least one token of text.")
            if len(prompt) > room and not truncate:
                raise UserError(
                    f"prompt {number} has {len(prompt)} tokens; with --max_new_tokens="
                    f"{max_new_tokens} at most {room} fit the model's max_seq_len="
                    f"{self.model_config.max_seq_len}. Shorten it, ask for fewer new tokens, "
                    "or pass --truncate_prompt to keep its last tokens."
                )
        return [p[-room:] for p in prompts]

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        eos_id: int,
        pad_id: int = 0,
        params=None,
        num_ids: int = 0,
        start_id: int | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt (up to and including eos); `params` (placed like
        self.params, e.g. a training run's current ones) default to self.params. Give the
        tokenizer's vocabulary size as `num_ids` so that no padding id is sampled, and an
        encoder-decoder's decoder start token (the tokenizer's bos) as `start_id`."""
        if self.model_config.encoder_layers and start_id is None:
            raise UserError(
                "an encoder-decoder decodes from a start token: this tokenizer has no bos; "
                "give one (data.tokenizer with a bos piece)."
            )
        rows = -(-len(prompts) // self.batch_multiple) * self.batch_multiple
        filler = [prompts[0]] * (rows - len(prompts))  # fills the data-parallel shards
        width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens, lengths = left_pad(prompts + filler, pad_id, width)
        # The seed is data; every other sampling field is compiled into the function.
        key = (
            tokens.shape, dataclasses.replace(sampling, seed=0), eos_id, pad_id, num_ids, start_id
        )
        if key not in self._compiled:
            self._compiled[key] = self._jit(sampling, eos_id, pad_id, num_ids, start_id or 0)
        with activate(self.mesh, self.rules):
            out, num_new = self._compiled[key](
                self.params if params is None else params,
                tokens,
                lengths,
                jax.random.key(sampling.seed),
            )
        out, num_new = np.asarray(out), np.asarray(num_new)
        return [out[row, : num_new[row]].tolist() for row in range(len(prompts))]

    def _jit(self, sampling: SamplingConfig, eos_id: int, pad_id: int, num_ids: int, start_id):
        def run(params, tokens, lengths, rng):
            return generate(
                self.model,
                params,
                tokens,
                lengths,
                rng,
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                eos_id=eos_id,
                pad_id=pad_id,
                num_ids=num_ids,
                kv_cache_dtype=sampling.kv_cache_dtype,
                start_id=start_id,
            )

        params_shardings = jax.tree.map(lambda a: a.sharding, self.abstract_params)
        everywhere = replicated(self.mesh)
        return jax.jit(
            run,
            in_shardings=(params_shardings, everywhere, everywhere, everywhere),
            out_shardings=everywhere,
        )
