"""Export a meshlm workdir as a Hugging Face model directory.

    python tools/export_hf.py --workdir=W OUT_DIR [--max_shard_gb=5]

OUT_DIR gets the newest checkpoint of W as a GPT2LMHeadModel, LlamaForCausalLM,
MixtralForCausalLM or Qwen3MoeForCausalLM (model/hf_layout.py says which model fits
which): config.json, the weights in the params' dtype as safetensors (model.safetensors,
or shards of at most --max_shard_gb listed in model.safetensors.index.json; experts one
tensor each, as save_pretrained and the Hub's files have them) and the tokenizer as
tokenizer.json with tokenizer_config.json (a sentencepiece model is converted, with the
same ids).
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer` load it, so
`lm_eval --model hf --model_args pretrained=OUT_DIR` and other tools work on it.

The params are read into this host's memory (numpy, through the CPU device);
the HF tensors are written a shard at a time. A compressed run (compress.py) is
written as the plain model: its int8/int4 weights dequantized and its low-rank
factors multiplied back (compression/quantize.py dense_params), as the summary says.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import startup  # noqa: E402

startup.quiet_start()  # before JAX is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from checkpoints.read import load_run  # noqa: E402
from compression.quantize import dense_params, plain_config  # noqa: E402
from data.hf_tokenizer import save_for_transformers  # noqa: E402
from errors import UserError  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf import config_to_hf, hf_tensors, param_shapes  # noqa: E402

INDEX = "model.safetensors.index.json"


def write_safetensors(tensors, out_dir: str, max_shard_bytes: int) -> int:
    """Writes `(name, array)`s as model.safetensors, or as shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own) with their index.
    Returns the number of files."""
    shards, current, size, total = [], {}, 0, 0

    def flush():
        path = os.path.join(out_dir, f"shard-{len(shards)}.tmp")
        save_file(current, path, metadata={"format": "pt"})  # transformers wants "format"
        shards.append((path, list(current)))
        current.clear()

    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(out_dir, "model.safetensors"))
        return 1
    weight_map = {}
    for number, (path, shard_names) in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, os.path.join(out_dir, file))
        weight_map.update(dict.fromkeys(shard_names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return len(shards)


def check_new_directory(out_dir: str) -> None:
    """UserError unless `out_dir` is missing or an empty directory: nothing is overwritten."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir!r} exists and is not empty; give a new or empty directory.")


def on_host(model_config: ModelConfig):
    """The params as ShapeDtypeStructs on this host's CPU."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), param_shapes(model_config)
    )


def _on_host(model_config: ModelConfig):
    """`on_host`, once the plain model (a compressed run's dense weights) is one that HF can
    express: anything else is refused before an array is read."""
    config_to_hf(plain_config(model_config))
    return on_host(model_config)


def export_hf(workdir: str, out_dir: str, max_shard_bytes: int) -> str:
    """Writes W's newest checkpoint into OUT_DIR; returns a one-line summary."""
    check_new_directory(out_dir)
    run = load_run(workdir, abstract=_on_host)
    config, step = run.config, run.step
    params, model_config = run.params, run.model_config
    if model_config != plain_config(model_config):  # a compressed run: write its plain model
        params, model_config = dense_params(params, model_config)
    params = jax.tree.map(np.asarray, params)

    tokenizer = save_for_transformers(
        config["data"]["tokenizer"], out_dir, model_config.max_seq_len
    )
    hf_config = config_to_hf(
        model_config,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    files = write_safetensors(hf_tensors(params, model_config), out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    return (
        f"Exported step {step} of {workdir} as a {hf_config['architectures'][0]} "
        f"({files} safetensors file(s), {model_config.param_dtype}{_undone(run.model_config)}) "
        f"into {out_dir}."
    )


def _undone(model_config: ModelConfig) -> str:
    """How a compressed run's weights were made plain for export, e.g. "; dequantized from
    int8"; "" for a plain run."""
    undone = []
    if model_config.quantization != "none":
        undone.append(f"dequantized from {model_config.quantization}")
    if model_config.low_rank_ratio:
        undone.append(f"low-rank factors (ratio {model_config.low_rank_ratio}) multiplied back")
    return "".join(f"; {u}" for u in undone)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python tools/export_hf.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--workdir", required=True, help="a meshlm workdir with a checkpoint")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors file")
    args = parser.parse_args(argv)
    try:
        if not args.max_shard_gb > 0:
            raise UserError(f"--max_shard_gb={args.max_shard_gb}: must be > 0.")
        print(export_hf(args.workdir, args.out_dir, int(args.max_shard_gb * 2**30)))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
