"""Export a LoRA run's adapters in the PEFT format, for `peft` to load over the base model.

    python tools/export_peft.py --workdir=W OUT_DIR --base=HF_BASE

OUT_DIR gets adapter_config.json and adapter_model.safetensors: the adapters of W's
newest (or --step) checkpoint, alone (a few MiB), named as PEFT names LoRA weights of a
LlamaForCausalLM. `--base` is written as base_model_name_or_path: the Hugging Face
model the run fine-tuned (the directory tools/import_hf.py read, or the base run
exported with tools/export_hf.py). Then

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), OUT_DIR)

gives the fine-tuned model, as `tools/export_hf.py --workdir=W` gives it merged.

Llama-family models only: GPT-2 packs query, key and value into one `c_attn`
matrix, where meshlm's three adapters are not one PEFT LoRA of the same rank.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from errors import UserError  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf import family_of  # noqa: E402
from model.hf_layout import LLAMA, tensor_layout  # noqa: E402
from model.lora import LoraConfig  # noqa: E402
from training.checkpoint import load_adapters, newest_step_meta  # noqa: E402

PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved adapter weights


def peft_tensors(adapters, config: ModelConfig) -> tuple[dict, list[str]]:
    """({PEFT weight name: array}, target module names) of meshlm adapters.

    meshlm adds x @ A @ B with A [*in, r] and B [r, *out] per layer (model/lora.py);
    PEFT adds x @ lora_A.T @ lora_B.T with lora_A [r, in] and lora_B [out, r] (torch's
    [out, in] order), the kernel axes flattened as the HF weight flattens them.
    """
    layout = tensor_layout(_llama_only(config), config)
    tensors, modules = {}, set()
    for path, ab in traverse_util.flatten_dict(adapters, sep="/", is_leaf=_is_pair).items():
        key = layout[f"{path}/kernel"].key  # "model.layers.{i}.self_attn.q_proj.weight"
        stem = PREFIX + key.removesuffix(".weight")
        modules.add(stem.split(".")[-1])
        rank = ab["a"].shape[-1]
        for i in range(config.num_layers):
            a = ab["a"][i].reshape(-1, rank)  # [in, r]
            b = ab["b"][i].reshape(rank, -1)  # [r, out]
            tensors[stem.format(i=i) + ".lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[stem.format(i=i) + ".lora_B.weight"] = np.ascontiguousarray(b.T)
    return tensors, sorted(modules)


def _llama_only(config: ModelConfig):
    family = family_of(config)  # UserError for a model HF cannot express
    if family is not LLAMA:
        raise UserError(
            f"PEFT export is for Llama-family models; this is a {family.architecture}, whose "
            "c_attn packs query, key and value in one matrix. Export the merged model with "
            "tools/export_hf.py instead."
        )
    return family


def _is_pair(_, node) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"}


def export_peft(workdir: str, out_dir: str, base: str, step: int | None = None) -> str:
    """Writes the adapters of W's step into OUT_DIR; returns a one-line summary."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir!r} exists and is not empty; give a new or empty directory.")
    step, meta = newest_step_meta(workdir, step)
    model_config = ModelConfig.from_dict(meta["config"]["model"])
    _llama_only(model_config)  # refused before anything is read
    lora = LoraConfig(**meta["config"].get("lora", {}))
    tensors, modules = peft_tensors(load_adapters(workdir, step), model_config)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
    size = sum(t.nbytes for t in tensors.values()) / 2**20
    return (
        f"Exported the rank-{lora.rank} adapters of step {step} of {workdir} ({', '.join(modules)};"
        f" {size:.1f} MiB) in the PEFT format into {out_dir}; base model: {base}."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python tools/export_peft.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="the PEFT adapter directory to write")
    parser.add_argument("--workdir", required=True, help="a meshlm workdir of a LoRA run")
    parser.add_argument(
        "--base", required=True, help="the HF model the run fine-tuned (a directory or hub name)"
    )
    parser.add_argument("--step", type=int, default=None, help="default: the newest")
    args = parser.parse_args(argv)
    try:
        print(export_peft(args.workdir, args.out_dir, args.base, args.step))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
