"""What eval.py does, callable from Python: evaluate one checkpoint, return the numbers.

Text (the run's validation data, other text files, or a TFDS split) gives loss,
perplexity, bits per byte and tokens/s, under the run's train.objective (an mlm run:
over masked tokens, with their accuracy); an SFT JSONL file gives the response-only
loss and generation metrics. Inputs are checked, and an SFT file read, before the
model is loaded, so a mistake costs seconds.
"""

import time

from checkpoints.read import load_sampler
from data.hf_tokenizer import load_tokenizer
from errors import UserError
from evaluation.evaluator import Evaluator
from evaluation.sft import evaluate_sft, read_examples
from evaluation.text_data import eval_batches, text_data_config
from model.sampler import SamplingConfig, parse_mesh

COLUMNS = (
    "loss",
    "perplexity",
    "bits_per_byte",
    "accuracy",
    "tokens",
    "exact_match",
    "bleu",
    "rouge_l",
)


def evaluate_workdir(
    workdir: str,
    *,
    step: int | None = None,
    mesh: str = "-1,1,1",
    text_files: str = "",
    tfds: str = "",
    tfds_text_key: str = "",
    tfds_data_dir: str = "",
    sft_file: str = "",
    skip_bad_lines: bool = False,
    max_batches: int | None = None,
    max_examples: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 0,
    devices=None,
) -> dict:
    """{"workdir", "step", "results": {data name: metrics}}; text is the run's validation
    data unless `text_files`, `tfds` or only `sft_file` is given."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    if text_files and tfds:
        raise UserError("give --text_files or --tfds, not both.")
    if batch_size < 0 or (max_batches or 0) < 0 or max_examples < 0:
        raise UserError("--batch_size, --max_batches and --max_examples must be >= 0.")
    examples = []
    if sft_file:
        examples = read_examples(sft_file, skip_bad_lines, max_examples)
    sampler, run = load_sampler(workdir, parse_mesh(mesh), devices, step)
    config = run.config
    batch_size = batch_size or config.train.global_batch_size
    evaluator = Evaluator(sampler, load_tokenizer(config.data.tokenizer), batch_size)
    results = {}
    if text_files or tfds or not sft_file:
        data = text_data_config(
            config.data,
            text_files=text_files,
            tfds=tfds,
            tfds_text_key=tfds_text_key,
            tfds_data_dir=tfds_data_dir,
        )
        start = time.perf_counter()
        try:
            batches = eval_batches(
                data, batch_size, sampler.model_config, max_batches, config.train
            )
        except UserError as error:
            raise UserError(f"--tfds={tfds}: {error}" if tfds else str(error)) from None
        metrics = evaluator.score(batches)
        metrics["tokens_per_second"] = metrics["tokens"] / (time.perf_counter() - start)
        results[text_files or (tfds and f"tfds:{tfds}") or "validation"] = metrics
    if examples:
        metrics, predictions = evaluate_sft(evaluator, examples, config.data, sampling)
        results[f"sft:{sft_file}"] = {**metrics, "predictions": predictions}
    return {"workdir": workdir, "step": run.step, "results": results}


def table(results: dict) -> str:
    """One row per evaluated data set, a column per metric it has."""
    lines = [f"{'data':32s}" + "".join(f"{c:>14s}" for c in COLUMNS)]
    for name, metrics in results.items():
        cells = "".join(
            f"{metrics[c]:14.{0 if c == 'tokens' else 4}f}" if c in metrics else " " * 14
            for c in COLUMNS
        )
        lines.append(f"{name[-32:]:32s}{cells}")
    return "\n".join(lines)
