"""Knowledge distillation: the `distill` section, and the teacher a run learns from.

With `distill.teacher` set, each train step also runs the teacher, a checkpoint of another
workdir restored with its own saved config (any depth or width; pruned, factorized or
quantized too), and the loss becomes

    alpha * T^2 * KL + (1 - alpha) * (cross-entropy + z-loss)

summed over the same weighted tokens as the cross-entropy (padding and the SFT loss mask
weigh both alike) and divided once by their weight (training/step.py). The KL compares
softmax(logits / T) of both models a chunk of positions at a time (training/loss.py
chunked_kl_sum). The teacher's params are an argument of the jitted step, not part of the
train state: never optimised nor checkpointed, they are read again when a run resumes.
It runs deterministically (no dropout) under stop_gradient.
"""

import dataclasses

import jax
import ml_collections
from absl import logging

from checkpoints.read import load_run, newest_step_meta
from config_schema import check_fields, field
from data.hf_tokenizer import load_tokenizer
from errors import UserError
from model.config import ModelConfig
from model.sampler import abstract_params
from model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """`config.distill`: learn from a teacher's predictions when `teacher` is set."""

    teacher: str = field(
        "",
        str,
        "a workdir whose checkpoint teaches this run (same tokenizer and vocab_size, any "
        "architecture); '' = off",
    )
    teacher_step: int = field(-1, "{-1} | [0, inf)", "distill.teacher's step; -1 = its newest")
    temperature: float = field(1.0, "(0, inf)", "both models' logits are divided by it in the KL")
    alpha: float = field(
        0.5, "[0, 1]", "weight of T^2 * KL; the cross-entropy (and z-loss) gets 1 - alpha"
    )
    kl: str = field(
        "forward",
        ("forward", "reverse"),
        "forward: KL(teacher || student), covers the teacher's modes; reverse: "
        "KL(student || teacher), seeks one",
    )

    def __post_init__(self):
        check_fields(self, "distill")


def _teacher_meta(distill: DistillConfig) -> tuple[int, dict]:
    """(step, meta) of the teacher's checkpoint; a UserError naming distill.teacher if none."""
    step = None if distill.teacher_step < 0 else distill.teacher_step
    try:
        return newest_step_meta(distill.teacher, step)
    except UserError as error:
        raise UserError(
            f"distill.teacher={distill.teacher!r}, distill.teacher_step={distill.teacher_step}: "
            f"{error}"
        ) from None


def _tokenizer_sha256(path: str, whose: str) -> tuple[str, str]:
    """(the tokenizer file's path, its sha256) of `config.data.tokenizer` = `path`."""
    try:
        tokenizer = load_tokenizer(path)
    except UserError as error:
        raise UserError(f"{whose}'s tokenizer: {error}") from None
    return tokenizer.path, tokenizer.sha256


def check(config, model_config: ModelConfig) -> None:
    """Refuses, before anything is compiled, a teacher workdir without the checkpoint asked
    for, and a teacher whose tokenizer file or vocab_size differs from the student's."""
    distill = DistillConfig(**config.distill)
    if not distill.teacher:
        return
    _, meta = _teacher_meta(distill)
    teacher_config = ml_collections.ConfigDict(meta["config"])
    where = f"distill.teacher={distill.teacher!r}"
    ours = _tokenizer_sha256(config.data.tokenizer, "the student (data.tokenizer)")
    theirs = _tokenizer_sha256(teacher_config.data.tokenizer, f"the teacher ({where})")
    if ours[1] != theirs[1]:
        raise UserError(
            f"{where}: the teacher's tokenizer {theirs[0]} (sha256 {theirs[1][:12]}...) differs "
            f"from the student's data.tokenizer {ours[0]} (sha256 {ours[1][:12]}...); "
            "distillation needs the same tokenizer."
        )
    if teacher_config.model.max_seq_len < config.data.seq_len:
        raise UserError(
            f"{where}: the teacher's model.max_seq_len={teacher_config.model.max_seq_len} is "
            f"shorter than data.seq_len={config.data.seq_len}; give windows the teacher can read."
        )
    teacher_vocab = teacher_config.model.vocab_size
    if teacher_vocab != model_config.vocab_size:
        raise UserError(
            f"{where}: the teacher's model.vocab_size={teacher_vocab} differs from the student's "
            f"model.vocab_size={model_config.vocab_size}; give the student the teacher's."
        )


class Teacher:
    """The teacher of a distillation run on the student's mesh: its config, model and
    abstract sharded params (for compiling), and its params, read by `load`."""

    def __init__(self, distill_config, mesh, rules):
        self.config = DistillConfig(**distill_config)
        self.step, meta = _teacher_meta(self.config)
        self.model_config = ModelConfig.from_dict(meta["config"]["model"])
        self.model = Transformer(self.model_config)
        self.abstract_params = abstract_params(self.model, mesh, rules)

    def load(self):
        """The teacher's params, sharded like `abstract_params` by the student's rules."""
        run = load_run(self.config.teacher, self.step, abstract=self.abstract_params)
        logging.info("Distilling from %s, step %d.", self.config.teacher, run.step)
        return run.params

    def hidden(self, params, batch):
        """The teacher's final hidden states and output projection for `batch`, constants of
        the step: deterministic, under stop_gradient."""
        out = self.model.apply(
            {"params": params},
            batch["inputs"],
            batch["segment_ids"],
            batch["positions"],
            deterministic=True,
            return_hidden=True,
        )
        return jax.lax.stop_gradient(out)
