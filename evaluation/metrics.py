"""Metric definitions, in one place so eval.py, training and the docs agree.

Bits per byte = total cross-entropy (nats) / ln 2 / total UTF-8 bytes of the text the
targets cover, where those bytes are counted by decoding each row's weighted target
tokens (`target_bytes`): runs with different tokenizers then compare.

Generation metrics compare each prediction with its reference: exact match (after
stripping surrounding whitespace, 0-1), corpus BLEU by sacrebleu with its default
13a tokenization (0-100), and ROUGE-L F-measure by rouge-score (its default tokenizer:
lowercased alphanumeric words, no stemming; 0-1, averaged over examples).
"""

import math

import numpy as np


def target_bytes(tokenizer, targets: np.ndarray, weights: np.ndarray) -> list[int]:
    """UTF-8 bytes of each row's decoded weighted targets (eos decodes to nothing)."""
    return [
        len(tokenizer.decode(row[mask > 0].tolist()).encode("utf-8"))
        for row, mask in zip(np.asarray(targets), np.asarray(weights))
    ]


def loss_metrics(ce_sum: float, tokens: float, num_bytes: int, correct=None) -> dict:
    """Mean loss, perplexity and bits per byte from sums over every target; with `correct`
    (targets whose argmax prediction is right), the accuracy. For a masked LM the targets
    are its masked tokens: the loss and perplexity are per masked token."""
    loss = ce_sum / max(tokens, 1.0)
    accuracy = {} if correct is None else {"accuracy": correct / max(tokens, 1.0)}
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": ce_sum / math.log(2) / max(num_bytes, 1),
        **accuracy,
        "tokens": tokens,
        "bytes": num_bytes,
    }


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Exact match, BLEU and ROUGE-L of predictions against references (same order)."""
    import sacrebleu  # imported here: rouge-score loads nltk, as slow as JAX, on every start
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    exact = [p.strip() == r.strip() for p, r in zip(predictions, references)]
    return {
        "exact_match": float(np.mean(exact)),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge_l": float(np.mean(rouge)),
        "examples": len(predictions),
    }
