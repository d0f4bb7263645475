"""Train and eval batches for the loop, from either of two pipelines.

data.pipeline=cache (the default): the corpus is tokenized once into a token
cache (data.prepare, data.token_cache; the first run prepares it), and batches
are windows read from it by index (data.windows): a global shuffle, an
iterator state of two integers that restores instantly, global batches that do
not depend on the number of processes, and no tokenization while training.

data.pipeline=stream: tf.data tokenizes the documents on the fly and shuffles
them in a local buffer (data.stream), for corpora too large to cache; its
state is per process and a restore re-tokenizes up to the saved position.

Both make the same windows (documents back to back, each ending in eos, cut
every seq_len + 1 tokens) and the batch format of data/batch.py, and both
evaluate on identical batches.

data.mixture blends several sources, each with its own token cache, by weight
into the cache pipeline's batches (data.mixture).

data.source=sft (fine-tuning) reads neither: whole JSONL examples are packed
into rows, with loss weights only on response tokens (data.sft_batches).

Given the run's train section, its train.objective (data.objectives) transforms
every batch of either pipeline: train batch i with draws of (seed, i), the i-th eval
batch with the same draws at every evaluation.
"""

from data import mixture, objectives, prepare, sft_batches, stream, windows
from data.config import validate
from data.hf_tokenizer import load_tokenizer
from errors import UserError


def _check(cfg, global_batch_size: int, process_count: int, model_vocab_size):
    checked = validate(cfg)
    if checked.mixture:  # each source checked as a data section of its own
        mixture.source_configs(checked)
    if global_batch_size < process_count or global_batch_size % process_count:
        raise UserError(
            f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}; "
            "make the global batch a multiple of the number of processes."
        )
    tokenizer = load_tokenizer(cfg.tokenizer)  # sentencepiece, or an imported tokenizer.json
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise UserError(
            f"data.tokenizer: {tokenizer.path!r} has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{model_vocab_size}; set the model's vocab_size >= {tokenizer.vocab_size} or use a smaller tokenizer."
        )
    return tokenizer


def make_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    model_vocab_size: int | None = None,
    train_config=None,
    encoder_seq_len: int = 0,
):
    """This process's endless stream of train batches, each array [global_batch_size // process_count, seq_len].
    `train_config` (config.train) gives the objective (None: clm); `encoder_seq_len` > 0 makes
    an encoder-decoder's batches (data/config.encoder_length), with encoder fields."""
    tokenizer = _check(data_config, global_batch_size, process_count, model_vocab_size)
    objective = _objective(train_config, data_config, tokenizer, seed, encoder_seq_len)
    if objective is not None:
        first_row = process_index * (global_batch_size // process_count)
        inner = make_train_iterator(
            _reading(data_config, objective),
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            model_vocab_size=model_vocab_size,
        )
        return ObjectiveTrainIterator(inner, objective, first_row)
    if data_config.source == "sft":
        return sft_batches.TrainIterator(
            sft_batches.Examples(
                data_config.sft_file, data_config, tokenizer, data_config.seq_len + 1
            ),
            data_config,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
    if data_config.pipeline == "stream":
        return stream.TrainIterator(
            data_config,
            tokenizer,
            batch_size=global_batch_size // process_count,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
    if data_config.mixture:
        return mixture.TrainIterator(
            _source_splits(data_config, tokenizer, "train"),
            mixture.weights(data_config),
            data_config,
            tokenizer.sha256,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
    return windows.TrainIterator(
        prepare.open_split(data_config, tokenizer, "train"),
        data_config,
        tokenizer.sha256,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def make_eval_batches(
    data_config,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    model_vocab_size: int | None = None,
    train_config=None,
    encoder_seq_len: int = 0,
):
    """This process's rows of the finite eval batches; the last batch is padded with weight 0.
    `train_config` (config.train) gives the objective (None: clm); `encoder_seq_len` as
    make_train_iterator's."""
    tokenizer = _check(data_config, global_batch_size, process_count, model_vocab_size)
    kwargs = dict(
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    objective = _objective(
        train_config, data_config, tokenizer, objectives.EVAL_SEED, encoder_seq_len
    )
    if objective is not None:
        data_config = _reading(data_config, objective)
    first_row = process_index * (global_batch_size // process_count)

    def transform(batches):
        return batches if objective is None else ObjectiveEvalStream(batches, objective, first_row)
    if data_config.source == "sft":
        examples = sft_batches.Examples(
            data_config.sft_eval_file, data_config, tokenizer, data_config.seq_len + 1
        )
        return sft_batches.EvalStream(examples, data_config, **kwargs)
    if data_config.pipeline == "stream":
        return transform(stream.EvalStream(data_config, tokenizer, **kwargs))
    if data_config.mixture:
        splits = _source_splits(data_config, tokenizer, "eval")
        return mixture.EvalStream(
            {n: transform(windows.EvalStream(s, data_config, **kwargs)) for n, s in splits.items()}
        )
    split = prepare.open_split(data_config, tokenizer, "eval")
    return transform(windows.EvalStream(split, data_config, **kwargs))


def _source_splits(data_config, tokenizer, split: str) -> dict:
    """`split` of each source of data.mixture, from its own token cache (prepared if missing)."""
    splits = {}
    for name, cfg in mixture.source_configs(data_config).items():
        try:
            splits[name] = prepare.open_split(cfg, tokenizer, split)
        except UserError as error:
            raise UserError(f"data.mixture source {name!r}: {error}") from None
    return splits


def _objective(train_config, data_config, tokenizer, seed: int, encoder_seq_len: int):
    """The run's objective, None for clm (batches as read); refuses a vocabulary without
    the ids it needs."""
    if train_config is None or train_config.get("objective", "clm") == "clm":  # older runs: clm
        return None
    return objectives.from_config(
        train_config, data_config.seq_len, tokenizer, seed, encoder_seq_len
    )


def _reading(data_config, objective):
    """The data config the windows are read with: span_corruption reads the windows whose
    corruption fits data.seq_len (and an encoder-decoder's encoder length) exactly
    (objectives.raw_seq_len)."""
    cfg = data_config.copy_and_resolve_references()
    cfg.seq_len = objectives.raw_seq_len(objective)
    return cfg


class ObjectiveTrainIterator:
    """Train batches under an objective. Batch i of the run gets the objective's draws of
    (seed, i); i is saved beside the inner iterator's state, so a resume continues exactly."""

    def __init__(self, inner, objective, first_row: int):
        self._inner, self._objective, self._first_row = inner, objective, first_row
        self._index = 0

    def __getattr__(self, name):  # invalid_utf8_documents, a mixture's source_tokens
        return getattr(self._inner, name)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._inner)
        batch = objectives.apply(self._objective, batch, self._index, self._first_row)
        self._index += 1
        return batch

    def get_state(self) -> dict:
        return {**self._inner.get_state(), "objective_batch": self._index}

    def set_state(self, state: dict) -> None:
        self._inner.set_state(state)
        self._index = int(state.get("objective_batch", 0))


class ObjectiveEvalStream:
    """Eval batches under an objective, the i-th with the same draws at every iteration."""

    def __init__(self, inner, objective, first_row: int):
        self._inner, self._objective, self._first_row = inner, objective, first_row

    def __getattr__(self, name):  # invalid_utf8_documents
        return getattr(self._inner, name)

    def __iter__(self):
        for index, batch in enumerate(self._inner):
            yield objectives.apply(self._objective, batch, index, self._first_row)
