"""Sample text from a trained (or imported) model.

    python sample.py --workdir=/tmp/meshlm --prompt="def main(" --max_new_tokens=64
    python sample.py --workdir=W --prompt_file=prompts.txt --num_samples=4 --temperature=0.8 --top_p=0.95

Loads the newest checkpoint of --workdir with the config it was trained with and
its tokenizer, places the parameters on a mesh of this host's devices (`--mesh`,
default: every device data-parallel), and generates with a KV cache (model/decode.py).
Each prompt is sampled `--num_samples` times; greedy decoding is `--temperature=0`.
"""

import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from configs.schema import check_fields, field
from errors import UserError
from model import Transformer
from model.config import ModelConfig
from model.decode import generate, left_pad
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
    """'-1,1,1' -> config.mesh-style sizes of (data, fsdp, tensor)."""
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(
            f"--mesh={text!r}: give three sizes data,fsdp,tensor, e.g. -1,1,1 or 1,2,4."
        ) from None
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


class Sampler:
    """A model's parameters on a device mesh and a jitted `generate` per sampling setting."""

    def __init__(
        self, model_config: ModelConfig, params, mesh_sizes, sharding_rules: str = "", devices=None
    ):
        """`params`: host arrays, or a callable taking the abstract sharded params to load."""
        self.model_config = model_config
        self.model = Transformer(model_config)
        self.mesh = make_mesh(mesh_sizes, devices)
        self.rules = logical_rules(sharding_rules)
        self.abstract_params = abstract_params(self.model, self.mesh, self.rules)
        if callable(params):
            self.params = params(self.abstract_params)
        else:
            shardings = jax.tree.map(lambda a: a.sharding, self.abstract_params)
            self.params = jax.device_put(params, shardings)
        self.batch_multiple = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self._compiled = {}

    def check_room(self, prompts: list[list[int]], max_new_tokens: int, truncate: bool):
        """The prompts, cut from the left when `truncate`, that leave room for the new tokens."""
        room = self.model_config.max_seq_len - max_new_tokens
        if room < 1:
            raise UserError(
                f"--max_new_tokens={max_new_tokens}: the model's max_seq_len is "
                f"{self.model_config.max_seq_len}; ask for fewer new tokens."
            )
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
        self, prompts: list[list[int]], sampling: SamplingConfig, eos_id: int, pad_id: int = 0
    ) -> list[list[int]]:
        """The new tokens of each prompt (up to and including eos)."""
        rows = -(-len(prompts) // self.batch_multiple) * self.batch_multiple
        filler = [prompts[0]] * (rows - len(prompts))  # fills the data-parallel shards
        width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens, lengths = left_pad(prompts + filler, pad_id, width)
        settings = dataclasses.astuple(sampling)[:4] + (eos_id, pad_id)
        key = (tokens.shape, settings)
        if key not in self._compiled:
            self._compiled[key] = self._jit(sampling, eos_id, pad_id)
        with activate(self.mesh, self.rules):
            out, num_new = self._compiled[key](
                self.params, tokens, lengths, jax.random.key(sampling.seed)
            )
        out, num_new = np.asarray(out), np.asarray(num_new)
        return [out[row, : num_new[row]].tolist() for row in range(len(prompts))]

    def _jit(self, sampling: SamplingConfig, eos_id: int, pad_id: int):
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
            )

        params_shardings = jax.tree.map(lambda a: a.sharding, self.abstract_params)
        everywhere = replicated(self.mesh)
        return jax.jit(
            run,
            in_shardings=(params_shardings, everywhere, everywhere, everywhere),
            out_shardings=everywhere,
        )


def load_sampler(workdir: str, mesh_sizes) -> tuple[Sampler, ml_collections.ConfigDict]:
    """A Sampler with the newest checkpoint of `workdir`, and that run's config."""
    from training import checkpoint  # orbax: only needed here

    step, meta = checkpoint.newest_step_meta(workdir)
    config = ml_collections.ConfigDict(meta["config"])
    model_config = ModelConfig.from_dict(config.model)
    sampler = Sampler(
        model_config,
        lambda abstract: checkpoint.load_params(workdir, step, abstract),
        mesh_sizes,
        config.get("sharding_rules", ""),
    )
    return sampler, config


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run to sample from (its newest checkpoint).")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
flags.DEFINE_string("prompt_file", None, "A file of prompts, one per line.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_bool(
    "truncate_prompt", False, "Keep the last tokens of a prompt too long for the model."
)
flags.DEFINE_string("mesh", "-1,1,1", "Devices along data,fsdp,tensor; -1 = the rest.")
for _field in dataclasses.fields(SamplingConfig):
    _define = flags.DEFINE_float if _field.type is float else flags.DEFINE_integer
    _define(_field.name, _field.default, _field.metadata["spec"].doc)
flags.mark_flag_as_required("workdir")


def read_prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompt_file:
        try:
            with open(FLAGS.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(
                f"--prompt_file={FLAGS.prompt_file!r}: cannot read it ({error})."
            ) from None
    if not prompts:
        raise UserError("give --prompt (repeatable) or --prompt_file.")
    if FLAGS.num_samples < 1:
        raise UserError(f"--num_samples={FLAGS.num_samples}: must be at least 1.")
    return [p for p in prompts for _ in range(FLAGS.num_samples)]


def main(argv):
    del argv
    try:
        sampling = SamplingConfig(
            **{f.name: FLAGS[f.name].value for f in dataclasses.fields(SamplingConfig)}
        )
        texts = read_prompts()
        sampler, config = load_sampler(FLAGS.workdir, parse_mesh(FLAGS.mesh))
        from data.hf_tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.data.tokenizer)
        prompts = sampler.check_room(
            [tokenizer.encode(t) for t in texts], sampling.max_new_tokens, FLAGS.truncate_prompt
        )
        completions = sampler.generate(prompts, sampling, tokenizer.eos_id)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    for number, (text, new) in enumerate(zip(texts, completions), 1):
        ended = " [eos]" if new and new[-1] == tokenizer.eos_id else ""
        print(f"--- sample {number}/{len(texts)} ({len(new)} new tokens{ended}) ---")
        print(text + tokenizer.decode([t for t in new if t != tokenizer.eos_id]))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
