"""Input-pipeline throughput: tokens/s per host for tokenize + pack + batch.

Runs the real train iterator (data.pipeline) with the bundled 8k BPE tokenizer
over the Python standard library's text, read (1) from local text files and
(2) from a TFDS dataset built locally from the same text, and times how long
restoring the iterator state takes. Nothing is downloaded.

  python benchmarks/input_pipeline.py [--seq_len=256] [--batch_size=64]
"""

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sentencepiece as spm  # noqa: E402

from data import sources  # noqa: E402
from data.config import default_data_config  # noqa: E402
from data.pipeline import make_train_iterator  # noqa: E402
from data.tokenizer import DEFAULT_TOKENIZER  # noqa: E402


def corpus(workdir: str) -> list[str]:
    """The stdlib's train-split .py files as text, one file per document, copied into workdir."""
    texts = []
    for path in sources.stdlib_files("train"):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    for i, text in enumerate(texts):
        with open(os.path.join(workdir, f"doc{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return texts


def build_tfds(texts: list[str], data_dir: str) -> None:
    import tensorflow_datasets as tfds

    tfds.dataset_builders.store_as_tfds_dataset(
        name="bench_text",
        version="1.0.0",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        split_datasets={"train": [(i, {"text": t}) for i, t in enumerate(texts)]},
        data_dir=data_dir,
    )


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_epochs(cfg, batch_size: int, epochs: int = 2) -> tuple[float, float, float, int]:
    """Real tokens per wall second and per CPU second, padded tokens/s and the real token count.

    Timed from building the iterator to the first batch after `epochs` epochs, so
    work that tf.data buffers ahead is counted; reading into the next epoch adds
    one start-up (~2 s) over the run. Tokens per CPU second is the cost, and
    moves less than wall time when other jobs share the cores.
    """
    real = total = 0
    start, start_cpu = time.perf_counter(), cpu_seconds()
    it = make_train_iterator(cfg, global_batch_size=batch_size, seed=0)
    while True:
        batch = next(it)
        if it.get_state()["epoch"] == epochs:
            break
        real += int((batch["segment_ids"] > 0).sum())
        total += batch["inputs"].size
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return real / elapsed, real / cpu, total / elapsed, real


def time_restore(cfg, batch_size: int, batches: int) -> float:
    it = make_train_iterator(cfg, global_batch_size=batch_size, seed=0)
    it.set_state({**it.get_state(), "window": batches * batch_size})
    start = time.perf_counter()
    next(it)
    return time.perf_counter() - start


def raw_sentencepiece(texts: list[str]) -> float:
    sp = spm.SentencePieceProcessor(model_file=DEFAULT_TOKENIZER)
    start = time.perf_counter()
    n = sum(len(ids) for ids in sp.encode(texts))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)"
    )
    with tempfile.TemporaryDirectory() as workdir:
        text_dir, tfds_dir = os.path.join(workdir, "text"), os.path.join(workdir, "tfds")
        os.makedirs(text_dir)
        texts = corpus(text_dir)
        build_tfds(texts, tfds_dir)
        print(f"corpus: {len(texts)} stdlib files, {sum(map(len, texts)) / 1e6:.1f} M characters")
        print(
            f"raw sentencepiece (Python, batched encode): {raw_sentencepiece(texts) / 1e6:.2f} M tokens/s"
        )
        base = default_data_config()
        base.update(seq_len=args.seq_len)
        files = base.copy_and_resolve_references()
        files.update(source="files", train_files=os.path.join(text_dir, "*.txt"))
        tfds_cfg = base.copy_and_resolve_references()
        tfds_cfg.update(source="tfds", tfds_name="bench_text", tfds_data_dir=tfds_dir)
        for name, cfg in (("text files", files), ("TFDS", tfds_cfg)):
            real, per_cpu, padded, count = time_epochs(cfg, args.batch_size)
            print(
                f"{name}: {real / 1e6:.2f} M real tokens/s per host ({padded / 1e6:.2f} M incl. padding; "
                f"{per_cpu / 1e6:.2f} M per CPU-second) over {count / 1e6:.1f} M tokens, "
                f"seq_len={args.seq_len}, batch={args.batch_size}"
            )
        for batches in (0, 500):
            seconds = time_restore(files, args.batch_size, batches)
            print(
                f"restore at batch {batches} of an epoch (files): {seconds:.2f} s to the first batch"
            )


if __name__ == "__main__":
    main()
