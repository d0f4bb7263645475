"""Compress a run for inference: prune, factorize and/or quantize its weights into a new workdir.

    python compress.py --workdir=W --output=W8 --quantize=int8
    python compress.py --workdir=W --output=W4 --quantize=int4 --group_size=128
    python compress.py --workdir=W --output=Ws --prune=wanda --n_m=2:4 --quantize=int8
    python compress.py --workdir=W --output=Wr --low_rank=whitened --rank_ratio=0.5

Reads the newest checkpoint of --workdir (or --step) into this host's memory and
applies the asked methods in the order prune -> low-rank -> quantize (pruning and
low-rank do not combine: factorizing fills the zeros back in). Wanda and whitened
SVD calibrate on --calibration_batches batches of the run's training data (or of
--calibration_text_files). --output becomes a workdir like any other (a params-only
checkpoint, config.json with the compressed model section, the tokenizer when it
lived inside --workdir) that sample.py, eval.py and tools/export_hf.py read, plus
compression.json: what was done, the sparsity of every pruned tensor, the parameter
count and weight bytes (int4 counts half a byte) before and after. Everything that
can be checked is checked before an array is read; the workdir is written beside
--output and renamed into place at the end, so a failure leaves nothing behind.
"""

import argparse
import dataclasses
import itertools
import json
import sys

import startup

startup.quiet_start(tensorflow=True)  # before JAX and TensorFlow are imported

import ml_collections  # noqa: E402

from checkpoints.read import load_run, newest_step_meta  # noqa: E402
from checkpoints.write import save_params  # noqa: E402
from compression import low_rank, prune  # noqa: E402
from compression.calibrate import input_statistics  # noqa: E402
from compression.quantize import quantize_params, weight_bytes  # noqa: E402
from data.pipeline import make_train_iterator  # noqa: E402
from data.sources import expand_globs  # noqa: E402
from errors import UserError  # noqa: E402
from evaluation.text_data import text_data_config  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.flops import count_params  # noqa: E402
from model.hf import param_shapes  # noqa: E402
from paths import workdir_path  # noqa: E402
from tools.export_hf import on_host  # noqa: E402


def parse_n_m(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    n, _, m = text.partition(":")
    if not (n.isdigit() and m.isdigit()):
        raise UserError(f"--n_m={text!r}: give N:M, e.g. 2:4.")
    return int(n), int(m)


def check_request(args, source: ModelConfig) -> ModelConfig:
    """The compressed model's config; UserError, naming the flag, for anything that cannot be
    done. Reads no array: pruning and factorizing are checked against the params' shapes."""
    if not (args.prune or args.low_rank or args.quantize):
        raise UserError("give at least one of --prune, --low_rank and --quantize.")
    if (args.sparsity is not None or args.n_m) and not args.prune:
        raise UserError("--sparsity and --n_m set how much --prune prunes: give --prune too.")
    if args.prune and args.low_rank:
        raise UserError(
            "--prune with --low_rank: factorizing a pruned kernel fills its zeros back in; "
            "give one of them (--quantize combines with either)."
        )
    if args.quantize and source.quantization != "none":
        raise UserError(
            f"--quantize: --workdir is already quantized (model.quantization="
            f"{source.quantization!r}); compress its float source instead."
        )
    for field, value in (("encoder_layers", source.encoder_layers),
                         ("prediction_head", source.prediction_head)):
        if value:
            raise UserError(
                f"--workdir's model.{field}={value}: compression walks the decoder's layers "
                "only, so this model's encoder or prediction head would be left out; compress "
                "a decoder-only model without a prediction head."
            )
    if args.calibration_batches < 1:
        raise UserError(f"--calibration_batches={args.calibration_batches}: must be >= 1.")
    target = source
    if args.prune:
        placeholder = {} if args.prune == "wanda" else None  # calibrated later
        prune.check(param_shapes(source), source, args.prune, args.sparsity,
                     parse_n_m(args.n_m), placeholder, args.prune_embeddings)
    if args.low_rank:
        placeholder = {} if args.low_rank == "whitened" else None
        target = low_rank.check(source, args.rank_ratio, args.low_rank_targets, args.low_rank,
                                 placeholder)
    if args.quantize:
        values = dict(
            dataclasses.asdict(target),
            quantization=args.quantize,
            quant_group_size=args.group_size,
            quantize_embeddings=args.quantize_embeddings,
        )
        try:
            target = ModelConfig.from_dict(values)
        except UserError as error:
            raise UserError(f"--quantize={args.quantize}: {error}") from None
    return target


def check_output(output: str) -> None:
    target = workdir_path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        holds = "holds a run" if (target / "checkpoints").exists() else "is not empty"
        raise UserError(
            f"--output={output!r} {holds}; compressing writes a new workdir: give a new or "
            "empty directory."
        )


def calibration_batches(config, model_config: ModelConfig, args) -> list[dict]:
    """The first --calibration_batches batches of the run's training data (or of
    --calibration_text_files), at the run's batch size."""
    data = text_data_config(config.data, text_files=args.calibration_text_files)
    batches = make_train_iterator(
        data,
        global_batch_size=config.train.global_batch_size,
        seed=config.seed,
        model_vocab_size=model_config.vocab_size,
    )
    return list(itertools.islice(batches, args.calibration_batches))


def compress(args) -> dict:
    """Writes --output; returns what compression.json records."""
    step, meta = newest_step_meta(args.workdir, args.step)
    config = ml_collections.ConfigDict(meta["config"])
    source = ModelConfig.from_dict(config.model)
    target = check_request(args, source)
    check_output(args.output)
    if args.calibration_text_files and (args.prune == "wanda" or args.low_rank == "whitened"):
        expand_globs(args.calibration_text_files, "--calibration_text_files")  # they match
    params = load_run(args.workdir, step, abstract=on_host).params
    record = {
        "source": {"workdir": str(workdir_path(args.workdir)), "step": step},
        "methods": [m for m in ("prune", "low_rank", "quantize") if getattr(args, m)],
        "params": {"before": count_params(params)},
        "weight_bytes": {"before": weight_bytes(params)},
    }
    calibrate = lambda gram: input_statistics(
        source, params, calibration_batches(config, source, args), gram=gram
    )
    if args.prune:
        stats = calibrate(False) if args.prune == "wanda" else None
        params, record["sparsity"] = prune.prune(
            params, source, method=args.prune, sparsity=args.sparsity, n_m=parse_n_m(args.n_m),
            stats=stats, include_embeddings=args.prune_embeddings,
        )
        record["prune"] = dict(method=args.prune, sparsity=args.sparsity, n_m=args.n_m or None,
                               embeddings=args.prune_embeddings)
    if args.low_rank:
        grams = calibrate(True) if args.low_rank == "whitened" else None
        params, _ = low_rank.factorize(params, source, ratio=args.rank_ratio,
                                       targets=args.low_rank_targets, method=args.low_rank,
                                       grams=grams)
        record["low_rank"] = dict(method=args.low_rank, rank_ratio=args.rank_ratio,
                                  targets=args.low_rank_targets)
    if args.quantize:
        params = quantize_params(params, target)
        record["quantize"] = dict(method=args.quantize, group_size=args.group_size,
                                  embeddings=args.quantize_embeddings)
    if args.prune == "wanda" or args.low_rank == "whitened":
        record["calibration"] = dict(batches=args.calibration_batches,
                                     text_files=args.calibration_text_files or "training data")
    record["params"]["after"] = count_params(params)
    record["weight_bytes"]["after"] = weight_bytes(params)
    config.model.update(dataclasses.asdict(target))
    if "lora" in config:
        config.lora.rank = 0  # a LoRA run's adapters are merged into the params
    write_workdir(args.output, args.workdir, params, config, target, record)
    return record


def write_workdir(output: str, workdir: str, params, config, model_config, record) -> None:
    """Writes the workdir beside `output` and renames it into place when it is complete."""
    final, source = workdir_path(output), workdir_path(workdir)
    temporary = final.parent / f".{final.name}.compressing"
    if temporary.exists():  # left by a run that was killed
        temporary.rmtree()
    try:
        tokenizer = config.data.tokenizer
        if tokenizer and str(workdir_path(tokenizer)).startswith(f"{source}/"):
            inside = workdir_path(tokenizer).relative_to(source)
            _copy(source / inside.parts[0], temporary / inside.parts[0])
            config.data.tokenizer = str(final / inside)
        save_params(str(temporary), params, json.loads(config.to_json_best_effort()),
                    model_config.weight_fields())
        (temporary / "config.json").write_text(config.to_json_best_effort(indent=2))
        (temporary / "compression.json").write_text(json.dumps(record, indent=2))
        if final.exists():
            final.rmdir()  # checked empty
        temporary.rename(final)
    except BaseException:
        if temporary.exists():
            temporary.rmtree()
        raise


def _copy(source, target) -> None:
    """Copies a file or a directory tree (epath: the workdirs may be on gs://)."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            _copy(child, target / child.name)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.copy(target)


def summary(record: dict, output: str) -> str:
    """A few lines: the sparsity of each pruned tensor, parameters and weight bytes."""
    lines = [f"{path:32s} {value:7.2%} zeros" for path, value in record.get("sparsity", {}).items()]
    params, sizes = record["params"], record["weight_bytes"]
    lines.append(
        f"Compressed step {record['source']['step']} of {record['source']['workdir']} "
        f"({', '.join(record['methods'])}) into {output}: parameters {params['before']:,} -> "
        f"{params['after']:,}, weight bytes {sizes['before']:,} -> {sizes['after']:,} "
        f"({sizes['before'] / sizes['after']:.2f}x smaller)."
    )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python compress.py", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--workdir", required=True, help="the run to compress")
    add("--output", required=True, help="the new workdir to write")
    add("--step", type=int, default=None, help="checkpoint step; default: the newest")
    add("--prune", default="", choices=("", *prune.METHODS), help="pruning method")
    add("--sparsity", type=float, default=None, help="fraction of each matrix's weights to zero")
    add("--n_m", default="", help="N:M pruning instead, e.g. 2:4, groups along the input")
    add("--prune_embeddings", action="store_true", help="prune the embeddings/output head too")
    add("--low_rank", default="", choices=("", *low_rank.METHODS), help="factorization method")
    add("--rank_ratio", type=float, default=0.5, help="rank = ceil(ratio x min(in, out))")
    add("--low_rank_targets", default="query,key,value,out,mlp", help="kernels to factorize")
    add("--quantize", default="", choices=("", "int8", "int4"), help="weight-only quantization")
    add("--group_size", type=int, default=128, help="int4: input elements sharing one scale")
    add("--quantize_embeddings", action="store_true", help="quantize the embeddings/head too")
    add("--calibration_batches", type=int, default=8, help="batches for wanda and whitened")
    add("--calibration_text_files", default="", help="globs of text to calibrate on instead")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        print(summary(compress(args), args.output))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    sys.stdout.flush()


if __name__ == "__main__":
    main()
