"""lm-evaluation-harness over a meshlm checkpoint, in-process (`pip install lm-eval==0.4.13`).

    import lm_eval
    from evaluation.lm_eval_adapter import MeshLM
    results = lm_eval.simple_evaluate(model=MeshLM("/tmp/meshlm"), tasks=["lambada_openai"])

Importing this module registers the model as "meshlm", so
`lm_eval.simple_evaluate(model="meshlm", model_args={"workdir": W, "mesh": "1,1,8"})`
works too (`prefix_token_id` is one more of its model_args, as for HFLM).
Only this module imports lm-eval; meshlm runs without it.

Scoring follows lm-eval's Hugging Face backend (HFLM): context and continuation are
tokenized as lm-eval's TemplateLM does, a sequence longer than the model keeps its
last max_length + 1 tokens, and an empty context (every rolling log-likelihood's first
window) is the prefix token alone, chosen by HFLM's rule: `prefix_token_id` if given,
else the tokenizer's bos if it has one, else eos. Runs trained here with the bundled
tokenizer never saw bos (each training document follows eos): give them
`prefix_token_id=` their eos id (docs/EVALUATION.md).
Rolling log-likelihoods use lm-eval's disjoint windows of max_length tokens.
Generation is greedy unless the task asks for `do_sample` with a temperature > 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from checkpoints.read import load_sampler
from data.hf_tokenizer import load_tokenizer
from errors import UserError
from evaluation.evaluator import Evaluator
from model.sampler import PROMPT_BUCKET, SamplingConfig, parse_mesh
from sharding import activate, batch_sharding, replicated


@register_model("meshlm")
class MeshLM(TemplateLM):
    """A meshlm checkpoint (newest step of `workdir`, or `step`) on a mesh of this host."""

    def __init__(
        self,
        workdir: str,
        mesh: str = "-1,1,1",
        step=None,
        batch_size=8,
        prefix_token_id=None,
        **unused,
    ):
        """`prefix_token_id`: the token an empty context is (HFLM's argument; default bos,
        else eos). `unused`: arguments lm-eval passes to every model (device, max_batch_size)."""
        super().__init__()
        step = None if step is None else int(step)
        self.sampler, run = load_sampler(workdir, parse_mesh(mesh), step=step)
        if run.model_config.encoder_layers:
            raise UserError(
                f"{workdir}: an encoder-decoder (model.encoder_layers="
                f"{run.model_config.encoder_layers}); the lm-eval adapter scores decoder-only "
                "models, which read the context and continuation as one sequence."
            )
        self._tokenizer = load_tokenizer(run.config.data.tokenizer)
        self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        vocab_size = self._tokenizer.vocab_size
        if self._prefix_token_id is not None and not 0 <= self._prefix_token_id < vocab_size:
            raise UserError(
                f"prefix_token_id={prefix_token_id}: not a token id of {workdir}'s tokenizer "
                f"(0 to {vocab_size - 1}); give its eos, {self._tokenizer.eos_id}, or leave it "
                "out for HFLM's choice (bos, else eos)."
            )
        self.batch_size = int(batch_size)
        self.max_length = self.sampler.model_config.max_seq_len
        self._evaluator = Evaluator(self.sampler, self._tokenizer, self.batch_size)
        self._scores = self._jit_scores()

    def _jit_scores(self):
        """(log-probability of each target, whether it is the argmax), [batch, length]."""
        sampler = self.sampler

        def scores(params, inputs, targets, segment_ids, positions):
            logits = sampler.model.apply({"params": params}, inputs, segment_ids, positions)
            logits = logits.astype(jnp.float32)
            logprobs = jax.nn.log_softmax(logits)
            target = jnp.take_along_axis(logprobs, targets[..., None], -1)[..., 0]
            return target, jnp.argmax(logits, -1) == targets

        rows = batch_sharding(sampler.mesh, sampler.rules)
        params = jax.tree.map(lambda a: a.sharding, sampler.abstract_params)
        return jax.jit(
            scores, in_shardings=(params,) + (rows,) * 4, out_shardings=replicated(sampler.mesh)
        )

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """HFLM's rule: `prefix_token_id` if given, else bos if the tokenizer has one, else eos."""
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        bos = self._tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self._tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self._tokenizer.decode(tokens)

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) of the last `n` tokens of each token list."""
        results = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            sequences = [tokens[-(self.max_length + 1) :] for tokens, _ in chunk]
            width = -(-max(len(s) - 1 for s in sequences) // PROMPT_BUCKET) * PROMPT_BUCKET
            width = min(width, self.max_length)
            num_rows = -(-self.batch_size // self.sampler.batch_multiple)
            num_rows *= self.sampler.batch_multiple  # one compiled shape per width
            arrays = np.zeros((4, num_rows, width), np.int32)
            for row, tokens in enumerate(sequences):
                n = len(tokens) - 1
                arrays[:, row, :n] = (tokens[:-1], tokens[1:], np.ones(n), np.arange(n))
            with activate(self.sampler.mesh, self.sampler.rules):
                logprobs, greedy = self._scores(self.sampler.params, *arrays)
            logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
            for row, (tokens, (_, count)) in enumerate(zip(sequences, chunk)):
                span = slice(max(len(tokens) - 1 - count, 0), len(tokens) - 1)
                results.append((float(logprobs[row, span].sum()), bool(greedy[row, span].all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = [
            (context + continuation, len(continuation)) for _, context, continuation in requests
        ]
        results = self._score_rows(rows)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in [request.args for request in requests]:
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._score_rows([(ctx + cont, len(cont)) for ctx, cont in windows])
            totals.append(sum(logprob for logprob, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def _sampling(self, gen_kwargs: dict) -> SamplingConfig:
        sample = gen_kwargs.get("do_sample", False) and gen_kwargs.get("temperature", 0) > 0
        return SamplingConfig(
            max_new_tokens=min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - 1),
            temperature=float(gen_kwargs["temperature"]) if sample else 0.0,
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same sampling settings are generated together, in batches."""
        args = [request.args for request in requests]
        groups = {}
        for index, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(self._sampling(gen_kwargs), []).append(index)
        outputs = [None] * len(args)
        for sampling, indices in groups.items():
            texts = self._evaluator.generate([args[i][0] for i in indices], sampling)
            for index, text in zip(indices, texts):
                until = args[index][1].get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                outputs[index] = text
                self.cache_hook.add_partial("generate_until", args[index], text)
        return outputs
