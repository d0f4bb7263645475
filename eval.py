"""Evaluate a checkpoint: loss, perplexity and bits per byte on text; response loss and
generation metrics on an SFT JSONL file.

    python eval.py --workdir=/tmp/meshlm                        # the run's validation data
    python eval.py --workdir=W --text_files='corpus/valid/*.txt' --output=eval.json
    python eval.py --workdir=W --tfds=lm1b:test --max_batches=50
    python eval.py --workdir=W --sft_file=test.jsonl --max_new_tokens=128

Loads the newest checkpoint of --workdir (or --step) with the config it was trained
with and its tokenizer, on a mesh of the devices (--mesh), prints a table and writes
the numbers as JSON (--output). Metric definitions: docs/EVALUATION.md. With
`--distributed` (docs/scaling.md) every host runs this with the same flags, reads the
same data, and process 0 prints the table and writes --output.
"""

import inspect
import json
import sys

import startup

startup.quiet_start()  # before JAX is imported (TensorFlow: only if the data needs it)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402

from errors import UserError  # noqa: E402
from training import distributed  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
flags.DEFINE_string(
    "mesh", "-1,1,1", "Devices along data,fsdp,tensor[,expert[,stage]]; -1 = the rest."
)
flags.DEFINE_string("text_files", "", "Comma-separated globs of text to score instead.")
flags.DEFINE_string("tfds", "", "NAME:SPLIT of a TFDS dataset to score instead.")
flags.DEFINE_string("tfds_text_key", "", "Its text feature; default: the run's data config.")
flags.DEFINE_string("tfds_data_dir", "", "Where it is prepared; default: the run's data config.")
flags.DEFINE_string("sft_file", "", "An SFT JSONL file: response loss and generation metrics.")
flags.DEFINE_bool("skip_bad_lines", False, "Skip (and count) bad lines of --sft_file.")
flags.DEFINE_integer("max_batches", None, "Text batches scored; 0 = all; default: the config's.")
flags.DEFINE_integer("max_examples", 0, "SFT examples scored (the first ones); 0 = all.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per SFT response.")
flags.DEFINE_float("temperature", 0.0, "SFT sampling temperature; 0 = greedy.")
flags.DEFINE_integer("batch_size", 0, "Sequences per batch; 0 = the run's global batch size.")
flags.DEFINE_string("output", "", "Write the results as JSON to this file.")
distributed.define_flags()
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # library chatter; the table is the output
    distributed.start_from_flags()
    try:
        from evaluation.run import evaluate_workdir, table

        options = inspect.signature(evaluate_workdir).parameters
        report = evaluate_workdir(**{name: FLAGS[name].value for name in options if name in FLAGS})
        if FLAGS.output and jax.process_index() == 0:
            try:  # epath: --output may be on gs:// like the workdir
                epath.Path(FLAGS.output).write_text(json.dumps(report, indent=2))
            except OSError as error:
                raise UserError(f"--output={FLAGS.output!r}: cannot write it ({error}).") from None
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    if jax.process_index() == 0:
        print(table(report["results"]))
        sys.stdout.flush()
    distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
