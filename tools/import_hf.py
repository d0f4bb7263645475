"""Import a Hugging Face model directory as a meshlm workdir.

    python tools/import_hf.py HF_DIR --workdir=W [--param_dtype=float32] [--dtype=bfloat16]

HF_DIR holds config.json (a GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM or
Qwen3MoeForCausalLM), the weights as safetensors (model.safetensors, or the shards
model.safetensors.index.json lists; a mixture of experts' experts one tensor each, as
save_pretrained writes them, or fused as transformers 5 holds them in memory)
and the tokenizer: tokenizer.json (with its tokenizer_config.json and chat template,
wherever transformers would read it from), or a sentencepiece tokenizer.model.
W gets a params-only checkpoint at step 0, its config.json (configs/base with the
imported model section) and the tokenizer (its chat template in its tokenizer_config.json)
under W/tokenizer/, which config.data.tokenizer names. sample.py and
tools/export_hf.py start from it; train.py continues from it (fresh optimizer,
data from the start) with --config=configs/json_file.py:W/config.json, which
needs a sentencepiece tokenizer (the data pipeline tokenizes in tf.data).

Tensors are read one at a time into the stacked meshlm params, so the model is
never held twice in memory; everything is checked before anything is written.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import startup  # noqa: E402

startup.quiet_start()  # before JAX is imported

import jax  # noqa: E402
import ml_dtypes  # noqa: E402, F401 -- registers bfloat16 with numpy, so safetensors can read it
import tokenizers  # noqa: E402
from etils import epath  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402

from checkpoints.write import save_params  # noqa: E402
from configs.base import get_base_config  # noqa: E402
from data.hf_tokenizer import CONFIG_FILE, HFTokenizer, read_tokenizer_config  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from errors import UserError  # noqa: E402
from model.config import DTYPES  # noqa: E402
from model.hf import config_from_hf, params_from_hf  # noqa: E402
from paths import workdir_path  # noqa: E402
from training.config import validate_config  # noqa: E402

INDEX = "model.safetensors.index.json"


class SafetensorsFiles(Mapping):
    """An HF checkpoint's tensors by name; each is read from its file only when asked for."""

    def __init__(self, paths: list[str], stack: contextlib.ExitStack):
        self._files = {}
        for path in paths:
            try:
                handle = stack.enter_context(safe_open(path, framework="numpy"))
            except (OSError, SafetensorError) as error:
                raise UserError(f"{path!r} is not a readable safetensors file ({error}).") from None
            for key in handle.keys():
                if key in self._files:
                    raise UserError(f"Tensor {key!r} is in two files, {path!r} and another.")
                self._files[key] = handle

    def __getitem__(self, key):
        return self._files[key].get_tensor(key)

    def __contains__(self, key):  # Mapping's default would read the tensor
        return key in self._files

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)


def objective_of(model_config) -> str:
    """The objective a continued training run starts with: what the model was made for (a
    masked LM's, an encoder-decoder's), next-token prediction otherwise."""
    if model_config.encoder_layers:
        return "span_corruption"
    return "mlm" if model_config.attention_mask == "bidirectional" else "clm"


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{os.path.dirname(path)!r} has no {os.path.basename(path)} ({what}).")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"Cannot read {path!r} ({error}).") from None


def weight_files(hf_dir: str) -> list[str]:
    """The safetensors files of the model: the shards the index lists, or model.safetensors."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        files = sorted(set(read_json(index, "the shard index").get("weight_map", {}).values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
        if missing or not files:
            raise UserError(f"{index!r} lists no shards, or shards that are missing: {missing}.")
        return [os.path.join(hf_dir, f) for f in files]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise UserError(
        f"{hf_dir!r} has no model.safetensors or {INDEX}: meshlm reads safetensors weights "
        "(load the model in transformers and save_pretrained it to convert other formats)."
    )


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


def find_tokenizer(hf_dir: str, hf_config: dict, vocab_size: int) -> tuple[str, dict | None]:
    """(tokenizer file in HF_DIR, the tokenizer_config to write beside its copy, None for
    sentencepiece); checked: it loads, has an eos token and fits the model's vocabulary."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(path):
        config = read_tokenizer_config(path)
        # Older tokenizers (GPT-2's) leave bos/eos to the model's config.json.
        ids = {name: _first(hf_config.get(f"{name}_id")) for name in ("bos_token", "eos_token")}
        from_model = {k: v for k, v in ids.items() if v is not None and not config.get(k)}
        if from_model:
            with contextlib.suppress(Exception):  # HFTokenizer below says what is wrong
                vocab = tokenizers.Tokenizer.from_file(path)
                config.update({k: vocab.id_to_token(v) for k, v in from_model.items()})
        tokenizer = HFTokenizer(path, config)
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        path, config = os.path.join(hf_dir, "tokenizer.model"), None
        tokenizer = Tokenizer(path)
    else:
        raise UserError(
            f"{hf_dir!r} has no tokenizer.json or tokenizer.model; copy the model's tokenizer "
            "into it (meshlm needs it to sample and evaluate)."
        )
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"{path!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size={vocab_size}."
        )
    return path, config


def on_cpu(params: dict) -> dict:
    """The params as jax arrays on the CPU device, moved one at a time so that each numpy
    array is freed once copied (the copy is asynchronous: waited for). orbax saves numpy
    arrays through a copy of each (measured), jax arrays without one."""
    cpu = jax.devices("cpu")[0]
    flat = traverse_util.flatten_dict(params)
    del params  # the caller passes the only reference
    for path in flat:
        flat[path] = jax.device_put(flat[path], cpu).block_until_ready()
    return traverse_util.unflatten_dict(flat)


def import_hf(hf_dir: str, workdir: str, dtype: str, param_dtype: str) -> str:
    """Writes HF_DIR as a new meshlm workdir; returns a one-line summary."""
    if not os.path.isdir(hf_dir):
        raise UserError(f"{hf_dir!r} is not a directory (give a Hugging Face model directory).")
    target = workdir_path(workdir)  # local, or e.g. gs://bucket/run
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(
            f"--workdir={workdir!r} exists and is not empty; importing writes a new workdir: "
            "give a new or empty directory."
        )
    hf_config = read_json(os.path.join(hf_dir, "config.json"), "not a Hugging Face model directory")
    model_config = config_from_hf(
        types.SimpleNamespace(**hf_config), dtype=dtype, param_dtype=param_dtype
    )
    config = get_base_config()
    config.model.update(dataclasses.asdict(model_config))
    config.data.seq_len = min(config.data.seq_len, model_config.max_seq_len)
    config.train.objective = objective_of(model_config)
    validate_config(config, num_devices=1)
    files = weight_files(hf_dir)
    tokenizer_path, tokenizer_config = find_tokenizer(hf_dir, hf_config, model_config.vocab_size)
    with contextlib.ExitStack() as stack:
        params = on_cpu(params_from_hf(SafetensorsFiles(files, stack), model_config))

    # Everything is checked: write the workdir.
    tokenizer_dir = target / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    epath.Path(tokenizer_path).copy(tokenizer_dir / os.path.basename(tokenizer_path))
    config.data.tokenizer = str(tokenizer_dir / os.path.basename(tokenizer_path))
    if tokenizer_config is not None:
        (tokenizer_dir / CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2))
    save_params(
        workdir, params, json.loads(config.to_json_best_effort()), model_config.weight_fields()
    )
    (target / "config.json").write_text(config.to_json_best_effort(indent=2))
    count = sum(x.size for x in jax.tree.leaves(params))
    return (
        f"Imported a {hf_config['model_type']} model ({count / 1e6:.2f}M parameters, "
        f"{len(files)} safetensors file(s)) into {workdir}; tokenizer {config.data.tokenizer}."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python tools/import_hf.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("hf_dir", help="a Hugging Face model directory")
    parser.add_argument("--workdir", required=True, help="the new meshlm workdir")
    parser.add_argument("--param_dtype", default="float32", choices=DTYPES)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype")
    args = parser.parse_args(argv)
    try:
        print(import_hf(args.hf_dir, args.workdir, args.dtype, args.param_dtype))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
