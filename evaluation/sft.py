"""SFT evaluation: response-only loss and generation metrics on a JSONL of examples.

Examples are read and encoded by data/sft.py with the run's data.sft_template: the
same text and loss weights as SFT training (1 on assistant tokens). Each example is
one row of a batch, its first seq_len + 1 tokens (as in training, a longer example is
cut there; they are counted). Generation prompts the model with the token ids before
the last assistant turn's content, exactly as training encodes them (sft.prompt_ids:
earlier turns' eos, one bos), and compares its response with that turn's content.
"""

import numpy as np
from absl import logging

from data import sft
from data.batch import BATCH_FIELDS, make_batch
from errors import UserError
from evaluation.metrics import generation_metrics


def read_examples(path: str, skip_bad_lines: bool, max_examples: int = 0) -> list[dict]:
    """The first `max_examples` (0 = all) examples of an SFT JSONL file."""
    examples, num_bad = sft.read_jsonl(path, skip_bad_lines=skip_bad_lines)
    if num_bad:
        logging.warning("%s: skipped %d bad lines.", path, num_bad)
    if not examples:
        raise UserError(f"{path}: no examples; give a JSONL file of SFT examples.")
    return examples[:max_examples] if max_examples else examples


def response_batches(examples, tokenizer, template, seq_len: int, batch_size: int):
    """(batches with one example per row, weights on its response tokens; number truncated)."""
    rows, truncated = {name: [] for name in BATCH_FIELDS}, 0
    for example in examples:
        ids, mask = sft.encode_example(tokenizer, example, template)
        truncated += len(ids) > seq_len + 1
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        n = len(ids) - 1
        row = dict(
            inputs=ids[:-1],
            targets=ids[1:],
            weights=mask[1:],
            segment_ids=np.ones(n),
            positions=np.arange(n),
            prefix_mask=np.zeros(n),
        )
        for name, values in row.items():
            rows[name].append(np.pad(np.asarray(values), (0, seq_len - n)))
    missing = -len(examples) % batch_size  # full batches: one compiled shape
    padded = {k: np.pad(np.stack(v), ((0, missing), (0, 0))) for k, v in rows.items()}
    batches = [
        make_batch(**{k: v[start : start + batch_size] for k, v in padded.items()})
        for start in range(0, len(examples), batch_size)
    ]
    return batches, truncated


def evaluate_sft(evaluator, examples, data_config, sampling, params=None):
    """(metrics: response loss, perplexity, bits per byte, exact match, BLEU, ROUGE-L;
    the generated responses). `data_config` is the run's: its template and seq_len."""
    template = sft.load_template(data_config.get("sft_template", "plain"), data_config.tokenizer)
    batches, truncated = response_batches(
        examples, evaluator.tokenizer, template, data_config.seq_len, evaluator.batch_size
    )
    metrics = evaluator.score(batches, params)
    prompts = [sft.prompt_ids(evaluator.tokenizer, example, template) for example in examples]
    predictions = evaluator.generate(prompts, sampling, params)
    metrics.update(generation_metrics(predictions, [sft.reference(e) for e in examples]))
    metrics["truncated"] = truncated
    return metrics, predictions
