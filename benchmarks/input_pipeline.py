"""Input pipeline: preparing the token cache, reading it, restoring, epoch boundaries, and
what the global shuffle is worth to a model.

  python benchmarks/input_pipeline.py                # prepare, read, restore, boundary waits
  python benchmarks/input_pipeline.py --loaders      # also grain and tf.data over the same cache
  python benchmarks/input_pipeline.py --quality      # only the model-quality runs (minutes)

Corpus: the Python standard library's train split (one document per .py file) with
the bundled 8k BPE tokenizer, prepared into a fresh temporary cache; the stream
pipeline (tf.data, tokenizing on the fly) is timed beside it. Batches are taken
back to back, so every time is the input's own cost (input-bound). Nothing is
downloaded. `--loaders` needs grain importable (`pip install grain`) for its rows.

--quality trains one small char-level model per pipeline on a single-document
corpus (the stdlib train files concatenated, cut at 1.1 M characters, the last
10 % held out) and prints each final validation loss, on the same eval batches:
the stream pipeline's local shuffle buffer against the global shuffle and random
offsets (about 5 minutes on 2 cores).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from data import packing, prepare  # noqa: E402
from data.config import default_data_config  # noqa: E402
from data.pipeline import make_train_iterator  # noqa: E402
from data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def read_speed(next_batch, batches: int, tokens_per_batch: int) -> tuple[float, float]:
    """(tokens per wall second, per CPU second), `batches` batches taken back to back."""
    next_batch()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        next_batch()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return batches * tokens_per_batch / wall, batches * tokens_per_batch / max(cpu, 1e-9)


def restore_seconds(cfg, batch: int, window: int) -> float:
    """A fresh iterator's set_state(window `window` of epoch 0) + its first batch."""
    it = make_train_iterator(cfg, global_batch_size=batch, seed=0)
    state = {**it.get_state(), "epoch": 0, "window": window}
    return timed(lambda: (it.set_state(state), next(it)))


def boundary_waits(it, num_windows: int, batch: int, around: int) -> list[float]:
    """Seconds each next() took, `around` batches either side of the end of epoch 0."""
    it.set_state({**it.get_state(), "epoch": 0, "window": num_windows - (around + 1) * batch})
    next(it)  # the restore itself is not a wait at the boundary
    return [timed(lambda: next(it)) for _ in range(2 * around)]


def report_waits(name: str, crossings: list[list[float]]) -> None:
    """Median and longest wait per batch position, each position's best over the crossings
    (other jobs on the cores delay random batches; a stall at the boundary delays every
    crossing), and the longest single wait seen."""
    waits = np.min(crossings, axis=0).tolist()
    middle, median, longest = len(waits) // 2, statistics.median(waits), max(waits)
    print(
        f"{name}: batch waits from {middle} batches before the epoch boundary to {middle} after, "
        f"best of {len(crossings)} crossing(s) per batch: median {median * 1e3:.2f} ms, longest "
        f"{longest * 1e3:.2f} ms (batch {waits.index(longest) - middle:+d}), longest/median "
        f"{longest / median:.2f}; longest single wait {np.max(crossings) * 1e3:.2f} ms"
    )


def cache_and_stream(cfg, args) -> None:
    tokenizer = Tokenizer()
    ident = prepare.identity(cfg, tokenizer)
    manifest = prepare.prepare(cfg, tokenizer, prepare.cache_directory(cfg, ident), ident)
    print(f"prepare: {prepare.summary(manifest)}")
    batch, tokens = args.batch_size, args.batch_size * cfg.seq_len
    num_windows = -(-manifest["splits"]["train"]["tokens"] // (cfg.seq_len + 1))
    train_mb = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"]) / 1e6
    seconds = timed(lambda: make_train_iterator(cfg, global_batch_size=batch, seed=0))
    print(
        f"open the train split (manifest, identity, sha256 of {train_mb:.0f} MB): {seconds:.2f} s"
    )
    it = make_train_iterator(cfg, global_batch_size=batch, seed=0)
    wall, per_cpu = read_speed(lambda: next(it), 2 * num_windows // batch, tokens)
    print(
        f"cache read: {wall / 1e6:.1f} M tokens/s per host ({per_cpu / 1e6:.1f} M per CPU-second)"
        f" over 2 epochs, batch {batch} x seq_len {cfg.seq_len}, global shuffle"
    )
    stream = cfg.copy_and_resolve_references()
    stream.pipeline = "stream"
    stream_it = make_train_iterator(stream, global_batch_size=batch, seed=0)
    wall, per_cpu = read_speed(lambda: next(stream_it), args.stream_batches, tokens)
    print(
        f"stream read: {wall / 1e6:.2f} M tokens/s per host ({per_cpu / 1e6:.2f} M per CPU-second)"
    )
    for fraction in (0.1, 0.5, 0.9):
        window = int(fraction * num_windows) // batch * batch
        cached, streamed = (restore_seconds(c, batch, window) for c in (cfg, stream))
        print(
            f"restore at {fraction:.0%} of an epoch (window {window:,}): cache "
            f"{cached * 1e3:.1f} ms, stream {streamed:.1f} s, to the first batch"
        )
    crossings = [boundary_waits(it, num_windows, batch, args.around) for _ in range(args.crossings)]
    report_waits("cache", crossings)
    report_waits("stream", [boundary_waits(stream_it, num_windows, batch, args.around)])


def loaders(cfg, args) -> None:
    """The same global shuffle and batches through grain, tf.data and plain numpy."""
    import tensorflow as tf

    batch, length = args.batch_size, cfg.seq_len + 1
    split = prepare.open_split(cfg, Tokenizer(), "train")
    n = split.num_windows(length)

    def features(indices):
        return packing.batch_features(*split.read(np.asarray(indices) * length, length), True)

    def tf_read(indices):
        return split.read(indices * length, length)

    def tf_shuffle(i):  # tf.random.experimental.index_shuffle, TensorFlow's table-free permutation
        seed = tf.stack([tf.constant(0, tf.int64), i[0] // n])
        return tf.random.experimental.index_shuffle(i % n, seed, n - 1)

    def tf_batches():
        indices = tf.data.Dataset.range(2**62).batch(batch).map(tf_shuffle)
        read = indices.map(lambda i: tf.numpy_function(tf_read, [i], (tf.int32, tf.int64)))
        it = read.prefetch(2).as_numpy_iterator()
        return lambda: packing.batch_features(*next(it), True)

    variants = {
        "numpy (data.windows)": lambda: (
            make_train_iterator(cfg, global_batch_size=batch, seed=0).__next__
        )
    }
    try:
        import grain

        def grain_batched():
            it = iter(grain.MapDataset.range(n).shuffle(seed=0).repeat().batch(batch).map(features))
            return lambda: next(it)

        def grain_per_window():
            windows = grain.MapDataset.range(n).shuffle(seed=0).repeat()
            rows = windows.map(lambda i: split.read([i * length], length))
            it = iter(rows.batch(batch, batch_fn=lambda r: [np.concatenate(x) for x in zip(*r)]))
            return lambda: packing.batch_features(*next(it), True)

        variants["grain, batch of indices then one read"] = grain_batched
        variants["grain, one window per element"] = grain_per_window
    except ImportError:
        print("grain is not installed: its rows are left out")
    variants["tf.data, index_shuffle + numpy_function read"] = tf_batches
    speeds = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved, so other jobs on the cores hit every variant
        for name, make in variants.items():
            speeds[name].append(read_speed(make(), args.loader_batches, batch * cfg.seq_len))
    for name, values in speeds.items():
        wall, per_cpu = zip(*values)
        print(
            f"loader {name}: {max(wall) / 1e6:.1f} M tokens/s (best of {args.rounds} rounds), "
            f"{max(per_cpu) / 1e6:.1f} M per CPU-second"
        )


def quality(args) -> None:
    from configs.default import get_config
    from data import sources
    from training import loop

    files = sources.stdlib_files("train")
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    text = text[: args.quality_characters]
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory() as workdir:
        for name, part in (("train.txt", text[:cut]), ("valid.txt", text[cut:])):
            with open(os.path.join(workdir, name), "w") as f:
                f.write(part)
        tok = train_tokenizer(
            [text[:cut]], os.path.join(workdir, "char.model"), vocab_size=256, model_type="char"
        )
        print(
            f"quality corpus: {len(text):,} characters as one document, {tok.vocab_size} pieces (char)"
        )
        runs = {
            "stream, local shuffle buffer of 1024 windows": {"pipeline": "stream"},
            "cache, global shuffle (permutation)": {"pipeline": "cache"},
            "cache, random offsets": {"pipeline": "cache", "sampling": "random_offsets"},
        }
        for seed in args.seeds:
            for run, (name, data) in enumerate(runs.items()):
                config = get_config()
                config.seed = seed
                config.model.update(
                    vocab_size=128,
                    num_layers=4,
                    embed_dim=128,
                    num_heads=4,
                    mlp_dim=512,
                    max_seq_len=64,
                )
                config.data.update(
                    source="files",
                    train_files=os.path.join(workdir, "train.txt"),
                    eval_files=os.path.join(workdir, "valid.txt"),
                    file_format="document",
                    tokenizer=tok.path,
                    seq_len=64,
                    eval_max_batches=0,
                    cache_dir=os.path.join(workdir, "cache"),
                    **data,
                )
                config.train.update(
                    num_steps=args.quality_steps, global_batch_size=12, log_every=100, eval_every=0
                )
                config.optimizer.update(learning_rate=2e-3, warmup_steps=100)
                config.checkpoint.every_steps = 0
                start = time.perf_counter()
                result = loop.train(config, os.path.join(workdir, f"seed{seed}-run{run}"))
                print(
                    f"quality seed {seed}, {name}: final eval loss {result['eval_loss']:.4f} "
                    f"after {args.quality_steps} steps of 12 x 64 ({time.perf_counter() - start:.0f} s)"
                )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--around", type=int, default=50, help="batches timed either side")
    parser.add_argument("--crossings", type=int, default=5, help="epoch boundaries crossed")
    parser.add_argument("--stream_batches", type=int, default=200)
    parser.add_argument("--loaders", action="store_true")
    parser.add_argument("--loader_batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality_steps", type=int, default=1500)
    parser.add_argument("--quality_characters", type=int, default=1_100_000)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    args = parser.parse_args()
    print(f"{describe_machine()} (other processes share these cores)")
    if args.quality:
        quality(args)
        return
    with tempfile.TemporaryDirectory() as workdir:
        cfg = default_data_config()
        cfg.update(seq_len=args.seq_len, cache_dir=os.path.join(workdir, "cache"))
        cache_and_stream(cfg, args)
        if args.loaders:
            loaders(cfg, args)


if __name__ == "__main__":
    main()
