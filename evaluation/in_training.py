"""config.eval's tasks, scored at every evaluation of a training run (off by default).

Extra text files give text_loss, text_perplexity, text_bits_per_byte; an SFT file gives
sft_loss (responses only), sft_exact_match, sft_bleu and sft_rouge_l of greedy responses.
The files are read when training starts (a bad one stops the run before anything is
written); the model is the train state's current params, on the training mesh. In a
multi-host run every process reads the files whole and places the rows it owns
(evaluation/evaluator.py), and process 0 logs the numbers.
"""

from absl import logging

from data.hf_tokenizer import load_tokenizer
from evaluation.config import EvalConfig
from evaluation.evaluator import Evaluator
from evaluation.sft import evaluate_sft, read_examples
from evaluation.text_data import eval_batches, text_data_config
from model.sampler import Sampler, SamplingConfig


class TrainingTasks:
    """Callable `(params, step) -> metrics`; {} when config.eval names no task."""

    def __init__(self, config, trainer):
        self._config, self._trainer = config, trainer
        cfg = EvalConfig(**config.eval)
        self._sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        batch_size = config.train.global_batch_size
        self._text = None
        if cfg.text_files:
            data = text_data_config(config.data, text_files=cfg.text_files)
            model = trainer.model_config
            self._text = eval_batches(data, batch_size, model, train=config.train)
        self._examples = []
        if cfg.sft_file:
            skip = config.data.get("skip_bad_lines", False)
            self._examples = read_examples(cfg.sft_file, skip, cfg.max_examples)
        self._evaluator = None

    def __call__(self, params, step: int) -> dict:
        if self._text is None and not self._examples:
            return {}
        if self._evaluator is None:  # built once, at the first evaluation
            config = self._config
            sampler = Sampler(
                self._trainer.model_config, params, config.mesh, config.sharding_rules
            )
            tokenizer = load_tokenizer(config.data.tokenizer)
            self._evaluator = Evaluator(sampler, tokenizer, config.train.global_batch_size)
        metrics = {}
        if self._text is not None:
            scores = self._evaluator.score(self._text, params)
            metrics.update({f"text_{k}": v for k, v in scores.items()})
        if self._examples:
            scores, _ = evaluate_sft(
                self._evaluator, self._examples, self._config.data, self._sampling, params
            )
            metrics.update({f"sft_{k}": v for k, v in scores.items()})
        logging.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics
