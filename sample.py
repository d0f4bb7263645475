"""Sample text from a trained (or imported) model.

    python sample.py --workdir=/tmp/meshlm --prompt="def main(" --max_new_tokens=64
    python sample.py --workdir=W --prompt_file=prompts.txt --num_samples=4 --temperature=0.8 --top_p=0.95
    python sample.py --workdir=W --prompt="def main(" --kv_cache_dtype=int8

Loads the newest checkpoint of --workdir with the config it was trained with and
its tokenizer, places the parameters on a mesh of the devices (`--mesh`, default:
every device data-parallel), and generates with a KV cache (model/decode.py).
Each prompt is sampled `--num_samples` times; greedy decoding is `--temperature=0`.
`--kv_cache_dtype=int8` keeps the KV cache in int8 with one scale per row, position and
KV head (about half a bfloat16 cache) instead of the model's compute dtype.
With `--distributed` (docs/scaling.md) every host runs this with the same flags and
process 0 prints the samples.
"""

import dataclasses
import sys

import startup

startup.quiet_start()  # before JAX is imported

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from checkpoints.read import load_sampler  # noqa: E402
from errors import UserError  # noqa: E402
from model.sampler import SamplingConfig, parse_mesh  # noqa: E402
from training import distributed  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run to sample from (its newest checkpoint).")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
flags.DEFINE_string("prompt_file", None, "A file of prompts, one per line.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_bool(
    "truncate_prompt", False, "Keep the last tokens of a prompt too long for the model."
)
flags.DEFINE_string(
    "mesh", "-1,1,1", "Devices along data,fsdp,tensor[,expert[,stage]]; -1 = the rest."
)
_DEFINE = {float: flags.DEFINE_float, int: flags.DEFINE_integer, str: flags.DEFINE_string}
for _field in dataclasses.fields(SamplingConfig):
    _DEFINE[_field.type](_field.name, _field.default, _field.metadata["spec"].doc)
distributed.define_flags()
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
    distributed.start_from_flags()
    try:
        sampling = SamplingConfig(
            **{f.name: FLAGS[f.name].value for f in dataclasses.fields(SamplingConfig)}
        )
        texts = read_prompts()
        sampler, run = load_sampler(FLAGS.workdir, parse_mesh(FLAGS.mesh))
        if run.config.train.get("objective", "clm") == "mlm":
            raise UserError(
                f"--workdir={FLAGS.workdir}: a masked LM (train.objective=mlm) fills in masked "
                "tokens and does not generate text left to right; score it with eval.py."
            )
        from data.hf_tokenizer import load_tokenizer

        tokenizer = load_tokenizer(run.config.data.tokenizer)
        prompts = sampler.check_room(
            [tokenizer.encode(t) for t in texts], sampling.max_new_tokens, FLAGS.truncate_prompt
        )
        completions = sampler.generate(
            prompts,
            sampling,
            tokenizer.eos_id,
            num_ids=tokenizer.vocab_size,
            start_id=tokenizer.bos_id,  # an encoder-decoder's decoder starts there
        )
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    if jax.process_index() == 0:
        for number, (text, new) in enumerate(zip(texts, completions), 1):
            ended = " [eos]" if new and new[-1] == tokenizer.eos_id else ""
            print(f"--- sample {number}/{len(texts)} ({len(new)} new tokens{ended}) ---")
            print(text + tokenizer.decode([t for t in new if t != tokenizer.eos_id]))
        sys.stdout.flush()
    distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
