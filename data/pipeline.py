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
"""

from data import mixture, prepare, sft_batches, stream, windows
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
):
    """This process's endless stream of train batches, each array [global_batch_size // process_count, seq_len]."""
    tokenizer = _check(data_config, global_batch_size, process_count, model_vocab_size)
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
):
    """This process's rows of the finite eval batches; the last batch is padded with weight 0."""
    tokenizer = _check(data_config, global_batch_size, process_count, model_vocab_size)
    kwargs = dict(
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    if data_config.source == "sft":
        examples = sft_batches.Examples(
            data_config.sft_eval_file, data_config, tokenizer, data_config.seq_len + 1
        )
        return sft_batches.EvalStream(examples, data_config, **kwargs)
    if data_config.pipeline == "stream":
        return stream.EvalStream(data_config, tokenizer, **kwargs)
    if data_config.mixture:
        splits = _source_splits(data_config, tokenizer, "eval")
        streams = {name: windows.EvalStream(s, data_config, **kwargs) for name, s in splits.items()}
        return mixture.EvalStream(streams)
    return windows.EvalStream(
        prepare.open_split(data_config, tokenizer, "eval"), data_config, **kwargs
    )


def _source_splits(data_config, tokenizer, split: str) -> dict:
    """`split` of each source of data.mixture, from its own token cache (prepared if missing)."""
    splits = {}
    for name, cfg in mixture.source_configs(data_config).items():
        try:
            splits[name] = prepare.open_split(cfg, tokenizer, split)
        except UserError as error:
            raise UserError(f"data.mixture source {name!r}: {error}") from None
    return splits
