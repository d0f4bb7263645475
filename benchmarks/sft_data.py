"""SFT data (data.source=sft): tokenizing the examples at start-up, batches, a restore.

  python benchmarks/sft_data.py                   # 20000 examples, seq_len 512, batch 32
  python benchmarks/sft_data.py --examples=100000

The examples are synthetic prompt/response pairs of stdlib source lines (a few
lines each, so a row holds several examples), written to a temporary JSONL file and
read with the bundled 8k BPE tokenizer. Batches are taken back to back: the time is
the input's own cost. A restore into a later epoch packs that epoch's rows anew.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.machine_info import describe as describe_machine  # noqa: E402
from data.config import default_data_config  # noqa: E402
from data.pipeline import make_train_iterator  # noqa: E402


def write_examples(path: str, count: int) -> None:
    lines = [line for line in open(json.__file__, encoding="utf-8").read().splitlines() if line]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            start = rng.randrange(len(lines) - 8)
            prompt, response = (
                lines[start : start + 3],
                lines[start + 3 : start + rng.randint(4, 8)],
            )
            f.write(json.dumps({"prompt": "\n".join(prompt), "response": "\n".join(response)}))
            f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        write_examples(path, args.examples)
        cfg = default_data_config()
        cfg.update(source="sft", sft_file=path, sft_eval_file=path, seq_len=args.seq_len)

        start = time.perf_counter()
        it = make_train_iterator(cfg, global_batch_size=args.batch, seed=0)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        batches = [next(it) for _ in range(args.batches)]
        per_batch = (time.perf_counter() - start) / args.batches
        tokens = sum(float((b["segment_ids"] > 0).sum()) for b in batches)
        weighted = sum(float(b["weights"].sum()) for b in batches)
        start = time.perf_counter()
        it.set_state({**it.get_state(), "epoch": 7, "row": 5})
        next(it)
        restore = time.perf_counter() - start
    cells = args.batches * args.batch * args.seq_len
    print(describe_machine())
    print(f"{args.examples} examples: read and tokenized in {setup:.2f} s")
    print(
        f"batch of {args.batch} x {args.seq_len}: {per_batch * 1e3:.2f} ms; "
        f"{tokens / cells:.1%} of the rows are tokens, {weighted / cells:.1%} response targets"
    )
    print(f"restore into epoch 7 and first batch: {restore * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
