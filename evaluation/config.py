"""The eval section of a config: evaluation tasks run inside training (off by default)."""

import dataclasses

from config_schema import check_fields, field


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`config.eval`: what training evaluates every train.eval_every steps besides the
    validation loss; each metric goes to metrics.jsonl and TensorBoard."""

    text_files: str = field(
        "", str, "comma-separated globs of text scored as text_loss, text_bits_per_byte; '' = off"
    )
    sft_file: str = field(
        "",
        "file",
        "SFT JSONL scored as sft_loss (responses only) and sft_exact_match, sft_bleu, "
        "sft_rouge_l of greedy responses; '' = off",
    )
    max_examples: int = field(64, "[0, inf)", "SFT examples scored (the first ones); 0 = all")
    max_new_tokens: int = field(64, "[1, inf)", "tokens generated per SFT response")

    def __post_init__(self):
        check_fields(self, "eval")
