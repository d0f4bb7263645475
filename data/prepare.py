"""Tokenize a corpus once into a token cache: `python -m data.prepare`.

    python -m data.prepare                     # configs/default.py: the Python stdlib
    python -m data.prepare --config.data.source=files --config.data.train_files='corpus/*.txt' \
        --config.data.eval_files=corpus/valid.txt --config.data.tokenizer=/tmp/my.model
    python -m data.prepare --config=configs/gpt2_small.py --config.data.source=tfds ...

It takes train.py's config and flags and prepares exactly the cache that a run
with that config reads: `data.cache_dir`, or by default
~/.cache/meshlm/tokens/<source>-<hash of the source and the tokenizer> (under
$XDG_CACHE_HOME if set). A training run with data.pipeline=cache prepares a
missing cache itself; this command does the work ahead of time.

The documents are the stream pipeline's (data.sources: same order, same UTF-8
cleaning, empty documents skipped), each followed by eos, tokenized by
sentencepiece on all of the host's cores while tf.data reads ahead. The cache is
written into a temporary directory beside its destination and renamed into
place once complete, so an interrupted preparation leaves nothing that looks
prepared, and processes preparing the same cache at once never mix their files.
An existing cache is never overwritten or re-tokenized.
"""

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np
from absl import logging

import startup
from data import mixture, sources, token_cache
from data.config import split_field, validate
from data.hf_tokenizer import load_tokenizer
from errors import UserError

tf = startup.LazyTensorFlow()
SPLITS = ("train", "eval")
DOCS_PER_BATCH = 1024  # documents per sentencepiece call (split over the cores)
SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB shards of uint16
PROGRESS_SECONDS = 30


def cache_root() -> str:
    return startup.user_cache_dir("tokens")


def identity(cfg, tokenizer) -> dict:
    """What a cache is made from: it is used only by configs with the same identity."""
    return {
        "format": token_cache.FORMAT,
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
        "source": {split: _source_identity(cfg, split) for split in SPLITS},
    }


def _source_identity(cfg, split: str) -> dict:
    """The source by name (TFDS) or by its files' paths, sizes and modification times."""
    train = split == "train"
    if cfg.source == "tfds":
        return {
            "tfds": cfg.tfds_name,
            "data_dir": os.path.abspath(os.path.expanduser(cfg.tfds_data_dir))
            if cfg.tfds_data_dir
            else "",
            "split": cfg.tfds_train_split if train else cfg.tfds_eval_split,
            "text_key": cfg.tfds_text_key,
        }
    if cfg.source == "stdlib":
        files, file_format = sources.stdlib_files(split), "document"
    else:
        globs = cfg.train_files if train else cfg.eval_files
        files, file_format = (
            sources.expand_globs(globs, split_field(cfg, split)),
            cfg.file_format,
        )
    stats = [(os.path.abspath(f), os.stat(f)) for f in files]
    listing = "".join(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n" for path, st in stats)
    return {
        "kind": cfg.source,
        "files": len(files),
        "bytes": sum(st.st_size for _, st in stats),
        "file_format": file_format,
        "paths_sizes_mtimes_sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }


def cache_directory(cfg, ident: dict) -> str:
    """data.cache_dir, or a directory under cache_root() named by the source and `ident`."""
    if cfg.cache_dir:
        return os.path.abspath(os.path.expanduser(cfg.cache_dir))
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = (
        f"tfds-{re.sub(r'[^A-Za-z0-9_.-]', '_', cfg.tfds_name)}"
        if cfg.source == "tfds"
        else cfg.source
    )
    return os.path.join(cache_root(), f"{name}-{key}")


def open_split(cfg, tokenizer, split: str) -> token_cache.TokenSplit:
    """`split` of the config's token cache, checked; the cache is prepared first if missing."""
    ident = identity(cfg, tokenizer)
    directory = cache_directory(cfg, ident)
    if not os.path.exists(os.path.join(directory, token_cache.MANIFEST)):
        prepare(cfg, tokenizer, directory, ident)
    manifest = token_cache.read_manifest(directory)
    token_cache.check_identity(directory, manifest, ident, tokenizer.path)
    return token_cache.open_split(directory, manifest, split)


def prepare(
    cfg, tokenizer, directory: str, ident: dict, shard_tokens: int = SHARD_TOKENS
) -> dict | None:
    """Tokenizes both splits into `directory`: its manifest, or None when another process
    completed the same cache first."""
    if os.path.exists(os.path.join(directory, token_cache.MANIFEST)):
        return None
    if os.path.isdir(directory) and os.listdir(directory):
        raise UserError(
            f"data.cache_dir={cfg.cache_dir!r}: {directory} is not empty and holds no "
            f"{token_cache.MANIFEST}: not a token cache; choose a new or empty directory."
        )
    cores = os.cpu_count() or 1
    logging.info("Preparing the token cache %s (once; tokenizing on %d cores)", directory, cores)
    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        partial = tempfile.mkdtemp(
            prefix=os.path.basename(directory) + ".partial-", dir=os.path.dirname(directory)
        )
    except OSError as error:
        raise _unwritable(cfg, directory, error) from None
    try:
        start = time.perf_counter()
        report = sources.InvalidUtf8Report()  # warns once, for the first file of either split
        splits = {
            split: _tokenize(cfg, tokenizer, split, partial, shard_tokens, report)
            for split in SPLITS
        }
        seconds = time.perf_counter() - start
        manifest = {
            "identity": ident,
            "dtype": token_cache.token_dtype(tokenizer.vocab_size),
            "splits": splits,
            "tokenizer_file": tokenizer.path,
            "prepared": {
                "seconds": round(seconds, 2),
                "cores": cores,
                "tokens_per_second": round(sum(s["tokens"] for s in splits.values()) / seconds),
            },
        }
        token_cache.write_manifest(partial, manifest)
        os.rename(partial, directory)  # atomic; fails if another process renamed first
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if os.path.exists(os.path.join(directory, token_cache.MANIFEST)):
            return None
        raise _unwritable(cfg, directory, error) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logging.info("Prepared %s: %s", directory, summary(manifest))
    return manifest


def _unwritable(cfg, directory: str, error: OSError) -> UserError:
    return UserError(
        f"data.cache_dir={cfg.cache_dir!r}: cannot write the token cache {directory} "
        f"({error.strerror or error}: {error.filename!r}); set data.cache_dir to a writable "
        "directory."
    )


def _tokenize(cfg, tokenizer, split: str, directory: str, shard_tokens: int, report) -> dict:
    """One split into `directory` with a SplitWriter; its manifest entry."""
    invalid_before = report.count

    def clean(origins, texts):
        return sources.clean_documents(origins, texts, report)

    docs = sources.documents(cfg, split).batch(DOCS_PER_BATCH)
    texts = docs.map(clean, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    dtype = token_cache.token_dtype(tokenizer.vocab_size)
    writer = token_cache.SplitWriter(directory, split, dtype, shard_tokens)
    threads, last_report = os.cpu_count() or 1, time.perf_counter()
    for batch in texts.as_numpy_iterator():
        if not len(batch):
            continue
        ids = tokenizer.encode_documents([text.decode() for text in batch], threads)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), writer.dtype, lengths.sum())
        writer.add(tokens, lengths)
        if time.perf_counter() - last_report > PROGRESS_SECONDS:
            last_report = time.perf_counter()
            logging.info("Preparing %s: %s tokens so far", split, f"{writer.num_tokens:,}")
    report.warn_once()
    if not writer.num_tokens:
        raise UserError(
            f"{split_field(cfg, split)}: the {split} split has no text (no documents, or "
            "all of them empty): nothing to prepare; add text."
        )
    return writer.close(report.count - invalid_before)


def summary(manifest: dict) -> str:
    splits = "; ".join(
        f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
        for name, s in manifest["splits"].items()
    )
    prepared = manifest["prepared"]
    return (
        f"{splits} ({manifest['dtype']}); tokenized in {prepared['seconds']:.1f} s, "
        f"{prepared['tokens_per_second'] / 1e6:.2f} M tokens/s on {prepared['cores']} cores"
    )


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value.data
    try:
        validate(cfg)
        if cfg.source == "sft":
            raise UserError(
                "data.source=sft has no token cache to prepare: fine-tuning examples are "
                "tokenized when training starts."
            )
        tokenizer = load_tokenizer(cfg.tokenizer)
        # data.mixture: one cache per source, each prepared as that source's own config.
        configs = mixture.source_configs(cfg) if cfg.mixture else {cfg.source: cfg}
        for name, source_cfg in configs.items():
            _prepare_and_check(source_cfg, tokenizer, name)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


def _prepare_and_check(cfg, tokenizer, name: str) -> None:
    """One source's cache: prepared if missing, then checked file by file, and summarised."""
    ident = identity(cfg, tokenizer)
    directory = cache_directory(cfg, ident)
    existed = os.path.exists(os.path.join(directory, token_cache.MANIFEST))
    if not existed:
        prepare(cfg, tokenizer, directory, ident)
    manifest = token_cache.read_manifest(directory)
    token_cache.check_identity(directory, manifest, ident, tokenizer.path)
    for split in SPLITS:
        token_cache.open_split(directory, manifest, split)  # checks every file
    print(f"{name}: {'already prepared, and checked' if existed else 'prepared'}: {directory}")
    print(summary(manifest))


if __name__ == "__main__":
    _CONFIG = startup.define_config_flag(
        "train.py's config file; its data section says what to prepare and where."
    )
    startup.run(main)
