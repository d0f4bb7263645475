"""Distillation benchmark: the same student trained alone and distilled from a teacher.

    python benchmarks/distill.py --teacher=W --out=/tmp/distill-bench
        [--steps=500] [--alpha=0.5] [--temperature=1.0] [--students=half,whitened]

Students, each trained twice with train.py on the teacher's config and data, for the
same steps, batch and tokens: (a) alone, (b) with `distill.teacher=W`:
  half      the teacher's config with half its layers, from a fresh init;
  whitened  the teacher factorized by compress.py (whitened SVD, rank ratio 0.5),
            fine-tuned from it (train.init_from).
Prints each run's final validation loss and perplexity (train.py's own evaluation)
and the median logged step time, so the teacher forward's overhead is the ratio of
the two step times. The last line printed is JSON with every number.
"""

import json
import math
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from benchmarks.machine_info import describe as describe_machine  # noqa: E402

flags.DEFINE_string("teacher", None, "The teacher run's workdir.")
flags.DEFINE_string("out", "/tmp/distill-bench", "Where the students' workdirs are written.")
flags.DEFINE_integer("steps", 500, "Training steps of every student run.")
flags.DEFINE_float("alpha", 0.5, "distill.alpha of the distilled runs.")
flags.DEFINE_float("temperature", 1.0, "distill.temperature of the distilled runs.")
flags.DEFINE_list("students", ["half", "whitened"], "Which students: half, whitened.")
flags.mark_flag_as_required("teacher")
FLAGS = flags.FLAGS


def teacher_config() -> dict:
    with open(os.path.join(FLAGS.teacher, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def student_flags(student: str) -> list[str]:
    """The flags that make `student` out of the teacher's config."""
    if student == "half":
        layers = max(1, teacher_config()["model"]["num_layers"] // 2)
        return [f"--config=configs/json_file.py:{os.path.join(FLAGS.teacher, 'config.json')}",
                f"--config.model.num_layers={layers}"]
    factorized = os.path.join(FLAGS.out, "whitened_r0.5")
    if not os.path.isdir(factorized):
        run([os.path.join(ROOT, "compress.py"), f"--workdir={FLAGS.teacher}",
             f"--output={factorized}", "--low_rank=whitened", "--rank_ratio=0.5"])
    return [f"--config=configs/json_file.py:{os.path.join(factorized, 'config.json')}",
            f"--config.train.init_from={factorized}", "--config.optimizer.learning_rate=3e-4",
            "--config.optimizer.warmup_steps=10"]


def run(command: list[str]) -> None:
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT, capture_output=True)


def train(student: str, distilled: bool) -> dict:
    """Trains one student (unless its workdir is complete); its last evaluation and the
    median step time of its logged steps."""
    workdir = os.path.join(FLAGS.out, f"{student}_{'distilled' if distilled else 'alone'}")
    command = [
        os.path.join(ROOT, "train.py"), *student_flags(student), f"--workdir={workdir}",
        f"--config.train.num_steps={FLAGS.steps}",
        f"--config.train.eval_every={FLAGS.steps}",
        f"--config.checkpoint.every_steps={FLAGS.steps}",
    ]
    if distilled:
        command += [f"--config.distill.teacher={FLAGS.teacher}",
                    f"--config.distill.alpha={FLAGS.alpha}",
                    f"--config.distill.temperature={FLAGS.temperature}"]
    run(command)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval_loss" in r]
    times = [r["step_time"] for r in records if "step_time" in r][1:]  # the first compiles
    return dict(eval_loss=evals[-1]["eval_loss"], perplexity=math.exp(evals[-1]["eval_loss"]),
                step_seconds=statistics.median(times),
                distill_kl=next((r["distill_kl"] for r in reversed(records) if "distill_kl" in r),
                                None))


def main(argv):
    del argv
    print(describe_machine())
    model = teacher_config()["model"]
    print(f"teacher: {FLAGS.teacher} ({model['num_layers']} layers x {model['embed_dim']}); "
          f"{FLAGS.steps} steps per student; alpha {FLAGS.alpha}, temperature {FLAGS.temperature}")
    print("| student | trained | validation loss | perplexity | step time |\n|---|---|---|---|---|")
    results = {}
    for student in FLAGS.students:
        for distilled in (False, True):
            row = train(student, distilled)
            name = f"{student} {'distilled' if distilled else 'alone'}"
            results[name] = row
            print(f"| {student} | {'distilled' if distilled else 'alone'} | "
                  f"{row['eval_loss']:.4f} | {row['perplexity']:.2f} | "
                  f"{row['step_seconds'] * 1000:.0f} ms |", flush=True)
        overhead = results[f"{student} distilled"]["step_seconds"] / results[
            f"{student} alone"]["step_seconds"]
        print(f"{student}: distilled step / alone step = {overhead:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
