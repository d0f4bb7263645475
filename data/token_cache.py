"""The token cache on disk: token shards, document starts and a manifest.

A prepared corpus is one directory (data.prepare writes it):

    manifest.json          what was prepared from what: the source and the tokenizer's
                           sha256 (`identity`), the token dtype, and per split its counts
                           and every file with its size and sha256. Written last, and the
                           directory is renamed into place only then, so a cache that has
                           a manifest is complete.
    train-00000.tokens ... the train split's documents back to back, each followed by eos:
                           raw little-endian uint16 (vocabulary <= 65,536) or uint32
    train.docs             the offset at which each document starts (int64)
    eval-00000.tokens ...  and eval.docs: the same for the eval split

Shards are memory-mapped, so reading a window copies only its own tokens,
whatever the corpus size. When a split is opened, its files' sizes and sha256
are checked against the manifest (in parallel, ~1.8 GB/s per core), so a
truncated or edited file is named before training starts. Nothing here ever
repairs, rewrites or re-tokenizes a cache: a bad one is reported with what to do.
"""

import bisect
import concurrent.futures
import hashlib
import itertools
import json
import os

import numpy as np

from data.packing import PAD_DOC
from errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DOC_DTYPE = np.dtype("<i8")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def redo(directory: str) -> str:
    """What to do about a cache that cannot be used."""
    return (
        f"delete {directory} and prepare it again (`python -m data.prepare` with this config, "
        "or the next training run does it), or set data.cache_dir to another directory"
    )


class TokenSplit:
    """One split of a cache: its tokens and document starts, read by token offset."""

    def __init__(self, directory: str, entry: dict, dtype: str):
        self.path = os.path.join(directory, MANIFEST)
        self.num_tokens, self.num_documents = entry["tokens"], entry["documents"]
        self.invalid_utf8_documents = entry["invalid_utf8_documents"]
        self._shards = [  # plain ndarray views: slicing a np.memmap costs ~1 us more
            np.memmap(
                os.path.join(directory, s["file"]), DTYPES[dtype], "r", shape=(s["tokens"],)
            ).view(np.ndarray)
            for s in entry["shards"]
        ]
        self._shard_starts = [0, *itertools.accumulate(s["tokens"] for s in entry["shards"])]
        docs = entry["docs"]
        self._doc_starts = np.memmap(
            os.path.join(directory, docs["file"]), DOC_DTYPE, "r", shape=(self.num_documents,)
        )

    def num_windows(self, length: int) -> int:
        """Windows of `length` tokens back to back; the last one may be partial."""
        return -(-self.num_tokens // length)

    def read(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, document ids int64), each [len(starts), length], of the windows that
        begin at token offsets `starts`; past the end, token 0 and document id PAD_DOC."""
        starts = np.asarray(starts, np.int64)
        tokens = np.zeros((len(starts), length), np.int32)
        for row, start in enumerate(starts.tolist()):
            self._copy(tokens[row], start)
        offsets = starts[:, None] + np.arange(length)
        doc_ids = np.searchsorted(self._doc_starts, offsets, side="right") - 1
        doc_ids[offsets >= self.num_tokens] = PAD_DOC
        return tokens, doc_ids

    def _copy(self, out: np.ndarray, start: int) -> None:
        """Tokens [start, start + len(out)) into `out`, across shard ends, up to the last token."""
        end = min(start + len(out), self.num_tokens)
        shard = bisect.bisect_right(self._shard_starts, start) - 1
        position = start
        while position < end:
            first = self._shard_starts[shard]
            stop = min(end, self._shard_starts[shard + 1])
            out[position - start : stop - start] = self._shards[shard][
                position - first : stop - first
            ]
            position, shard = stop, shard + 1


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["splits"]["train"], manifest["splits"]["eval"], manifest["identity"]["source"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"data.cache_dir: {path} cannot be read as a token cache manifest "
            f"({type(error).__name__}: {error}); {redo(directory)}."
        ) from None
    return manifest


def check_identity(directory: str, manifest: dict, identity: dict, tokenizer_path: str) -> None:
    """UserError unless the cache was prepared from this source with this tokenizer."""
    path = os.path.join(directory, MANIFEST)
    saved = manifest["identity"]
    if saved.get("format") != identity["format"]:
        raise UserError(
            f"data.cache_dir: {path} has cache format {saved.get('format')!r}; this code reads "
            f"format {identity['format']}: {redo(directory)}."
        )
    if saved.get("tokenizer") != identity["tokenizer"]:
        made_with = manifest.get("tokenizer_file", "?")
        raise UserError(
            f"data.cache_dir: {path} was prepared with another tokenizer ({made_with}, sha256 "
            f"{saved.get('tokenizer', {}).get('sha256', '?')[:12]}...) than data.tokenizer "
            f"({tokenizer_path}, sha256 {identity['tokenizer']['sha256'][:12]}...); a cache is "
            f"never used with another tokenizer: {redo(directory)}."
        )
    changes = _differences(saved["source"], identity["source"], "source.")
    if changes:
        raise UserError(
            f"data.cache_dir: {path} was prepared from another source than the config's "
            f"({'; '.join(changes[:3])}); files added, removed, resized or modified since count "
            f"as another source: {redo(directory)}."
        )


def _differences(saved, current, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [
            d for k in keys for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")
        ]
    return [] if saved == current else [f"{prefix[:-1]}: {saved!r} then, {current!r} now"]


def open_split(directory: str, manifest: dict, split: str) -> TokenSplit:
    """The split, after checking every one of its files against the manifest."""
    entry = manifest["splits"][split]
    files = [(s["file"], s["bytes"], s["sha256"]) for s in entry["shards"]]
    files.append((entry["docs"]["file"], entry["docs"]["bytes"], entry["docs"]["sha256"]))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        problems = pool.map(lambda f: _problem(os.path.join(directory, f[0]), *f[1:]), files)
        for problem in problems:
            if problem:
                raise UserError(f"data.cache_dir: {problem}; {redo(directory)}.")
    return TokenSplit(directory, entry, manifest["dtype"])


def _problem(path: str, size: int, sha256: str) -> str | None:
    """What is wrong with a cache file, or None."""
    try:
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} has {actual} bytes, the manifest says {size} (truncated or edited)"
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    if digest != sha256:
        return f"{path} does not match the sha256 in the manifest (edited or corrupted)"
    return None


class SplitWriter:
    """Writes one split's tokenized documents as shards of `shard_tokens` tokens (the last
    one shorter)."""

    def __init__(self, directory: str, split: str, dtype: str, shard_tokens: int):
        self._directory, self._split = directory, split
        self.dtype, self._shard_tokens = DTYPES[dtype], shard_tokens
        self._pending, self._pending_tokens = [], 0
        self._doc_starts, self._shards = [], []
        self.num_tokens = self.num_documents = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their tokens back to back and each one's length."""
        self._doc_starts.append(self.num_tokens + np.cumsum(lengths) - lengths)
        self._pending.append(tokens.astype(self.dtype))
        self._pending_tokens += len(tokens)
        self.num_tokens += len(tokens)
        self.num_documents += len(lengths)
        while self._pending_tokens >= self._shard_tokens:  # documents may continue in the next
            pending = np.concatenate(self._pending)
            self._flush(pending[: self._shard_tokens])
            self._pending = [pending[self._shard_tokens :]]
            self._pending_tokens = len(self._pending[0])

    def _flush(self, data: np.ndarray) -> None:
        name = f"{self._split}-{len(self._shards):05d}.tokens"
        self._shards.append({"file": name, "tokens": len(data), **self._write(name, data)})

    def _write(self, name: str, data: np.ndarray) -> dict:
        with open(os.path.join(self._directory, name), "wb") as f:
            f.write(memoryview(data))
        return {"bytes": data.nbytes, "sha256": hashlib.sha256(memoryview(data)).hexdigest()}

    def close(self, invalid_utf8_documents: int) -> dict:
        """Writes what is left; the split's manifest entry."""
        if self._pending_tokens:
            self._flush(np.concatenate(self._pending))
        docs = np.concatenate(self._doc_starts).astype(DOC_DTYPE)
        return {
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            "invalid_utf8_documents": invalid_utf8_documents,
            "shards": self._shards,
            "docs": {"file": f"{self._split}.docs", **self._write(f"{self._split}.docs", docs)},
        }


def write_manifest(directory: str, manifest: dict) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
