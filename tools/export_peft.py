"""Export a LoRA run's adapters in the PEFT format, for `peft` to load over the base model.

    python tools/export_peft.py --workdir=W OUT_DIR --base=HF_BASE

OUT_DIR gets adapter_config.json and adapter_model.safetensors: the adapters of W's
newest (or --step) checkpoint, alone (a few MiB), named as PEFT names the LoRA weights
of the exported LlamaForCausalLM or GPT2LMHeadModel. `--base` is written as base_model_name_or_path: the Hugging Face
model the run fine-tuned (the directory tools/import_hf.py read, or the base run
exported with tools/export_hf.py). Then

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), OUT_DIR)

gives the fine-tuned model, as `tools/export_hf.py --workdir=W` gives it merged.
Both families: GPT-2's c_attn, which packs query, key and value, gets one adapter
of the adapted ones' summed rank (`peft_tensors`).
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import startup  # noqa: E402

startup.quiet_start()  # before JAX is imported

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from checkpoints.read import load_adapters, load_run  # noqa: E402
from errors import UserError  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf import family_of  # noqa: E402
from model.hf_layout import GPT2, tensor_layout  # noqa: E402
from model.lora import LoraConfig  # noqa: E402
from tools.export_hf import check_new_directory  # noqa: E402

PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved adapter weights


def peft_tensors(adapters, config: ModelConfig, rank: int) -> tuple[dict, dict]:
    """({PEFT weight name: array}, {HF module name, "{i}" for the layer: rank}).

    meshlm adds x @ A @ B with A [*in, r] and B [r, *out] per layer (model/lora.py);
    PEFT adds x @ lora_A.T @ lora_B.T with lora_A [r, in] and lora_B [out, r] (torch's
    [out, in] order), the kernel axes flattened as the HF weight flattens them. Where HF
    packs several kernels in one matrix (GPT-2's c_attn: query, key, value), their
    adapters become one PEFT adapter of the summed rank: the A's stacked, the B's on
    the block diagonal at their slices of the output, which adds exactly what meshlm's
    separate adapters add.
    """
    layout = tensor_layout(family_of(config), config)
    packed = {}  # HF module name -> (number of slices, {slice index: adapter})
    for path, ab in traverse_util.flatten_dict(adapters, sep="/", is_leaf=_is_pair).items():
        tensor = layout[f"{path}/kernel"]
        k, n = tensor.part or (0, 1)
        packed.setdefault(tensor.key.removesuffix(".weight"), (n, {}))[1][k] = ab
    tensors, ranks = {}, {}
    for module, (n, parts) in packed.items():
        order = sorted(parts)
        ranks[module] = rank * len(order)
        for i in range(config.num_layers):
            a = [parts[k]["a"][i].reshape(-1, rank).T for k in order]  # [r, in]
            b = [parts[k]["b"][i].reshape(rank, -1).T for k in order]  # [out, r]
            width = b[0].shape[0]
            lora_b = np.zeros((n * width, ranks[module]), b[0].dtype)
            for j, k in enumerate(order):
                lora_b[k * width : (k + 1) * width, j * rank : (j + 1) * rank] = b[j]
            name = PREFIX + module.format(i=i)
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(np.concatenate(a))
            tensors[name + ".lora_B.weight"] = lora_b
    return tensors, ranks


def _is_pair(_, node) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"}


def adapter_config(lora: LoraConfig, ranks: dict, family, base: str) -> dict:
    """adapter_config.json. The target modules are one regex of whole module names
    (GPT-2's attention and MLP both have a c_proj); a packed module's rank and alpha
    grow together, so that its scale stays alpha / rank."""
    names = sorted(re.escape(m).replace(re.escape("{i}"), r"\d+") for m in ranks)
    packed = {m.rsplit(".", 1)[-1]: r for m, r in ranks.items() if r != lora.rank}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "rank_pattern": packed,
        "alpha_pattern": {m: lora.alpha * r / lora.rank for m, r in packed.items()},
        "lora_dropout": lora.dropout,
        "target_modules": "|".join(names),
        "bias": "none",
        "fan_in_fan_out": family is GPT2,  # GPT-2's Conv1D weights are [in, out]
        "use_rslora": False,
        "inference_mode": True,
    }


def export_peft(workdir: str, out_dir: str, base: str, step: int | None = None) -> str:
    """Writes the adapters of W's step into OUT_DIR; returns a one-line summary."""
    check_new_directory(out_dir)
    run = load_run(workdir, step)  # the config and step alone: no arrays read yet
    model_config, step = run.model_config, run.step
    family = family_of(model_config)  # a model HF cannot express is refused before reading
    lora = LoraConfig(**run.config.get("lora", {}))
    tensors, ranks = peft_tensors(load_adapters(workdir, step), model_config, lora.rank)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(adapter_config(lora, ranks, family, base), f, indent=2)
    modules = sorted({m.rsplit(".", 1)[-1] for m in ranks})
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
