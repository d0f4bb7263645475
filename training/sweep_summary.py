"""`sweep.py --summarize=W`: one table and one figure for all trials of a sweep.

Reads each trial's status.json and metrics.jsonl (sequential and vectorized
trials write the same files) and writes W/summary.csv, W/summary.md and
W/summary.png. A best value at the edge of what was tried is flagged: the
optimum may lie outside the range.
"""

import csv
import io
import math

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from paths import workdir_path  # noqa: E402
from training import sweeps  # noqa: E402

COLUMNS = ("final_eval_loss", "best_eval_loss", "final_loss", "tokens_per_second", "step")


def trial_row(workdir: str, name: str, overrides: dict) -> dict:
    """The swept values, the results and the status of one trial."""
    trial_dir = workdir_path(workdir) / name
    records = sweeps.read_metrics(trial_dir)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    trains = [r for r in records if "loss" in r]
    status = sweeps.read_status(trial_dir)
    return {
        "trial": name,
        **overrides,
        "status": status["status"],
        "final_eval_loss": evals[-1] if evals else math.nan,
        "best_eval_loss": min(evals) if evals else math.nan,
        "final_loss": trains[-1]["loss"] if trains else math.nan,
        "tokens_per_second": trains[-1]["tokens_per_second"] if trains else math.nan,
        "step": records[-1]["step"] if records else 0,
        "error": status["error"],
    }


def edge_warnings(rows: list[dict], keys: list[str]) -> list[str]:
    """A line for each swept field whose best trial (lowest best_eval_loss) used its min or max."""
    scored = [r for r in rows if math.isfinite(r["best_eval_loss"])]
    if not scored:
        return []
    best = min(scored, key=lambda r: r["best_eval_loss"])
    warnings = []
    for key in keys:
        values = sorted({r[key] for r in rows if isinstance(r[key], (int, float))})
        if len(values) >= 3 and best[key] in (values[0], values[-1]):
            side = "lowest" if best[key] == values[0] else "highest"
            warnings.append(
                f"best {key}={best[key]} is the {side} value tried: the optimum may lie outside "
                "the range; extend it."
            )
    return warnings


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_table(workdir: str, rows: list[dict], warnings: list[str]) -> None:
    workdir = workdir_path(workdir)
    fields = list(rows[0])
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fields)
    writer.writeheader()
    writer.writerows(rows)
    (workdir / "summary.csv").write_text(table.getvalue())
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_format(r[k]) for k in fields) + " |" for r in rows]
    lines += [""] + [f"**Warning:** {w}" for w in warnings]
    (workdir / "summary.md").write_text("\n".join(lines) + "\n")


def write_plot(workdir: str, rows: list[dict], keys: list[str]) -> None:
    """Best eval loss against each swept value, then every trial's training loss curve."""
    figure, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [  # a trial that does not set `key` has "" there: nothing to plot
            (r[key], r["best_eval_loss"])
            for r in rows
            if r[key] != "" and math.isfinite(r["best_eval_loss"])
        ]
        if points:
            ax.scatter(*zip(*points))
        values = [p[0] for p in points if isinstance(p[0], (int, float))]
        if values and min(values) > 0 and max(values) / min(values) >= 4:  # rates
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best eval loss")
    workdir = workdir_path(workdir)
    curves = axes[0][-1]
    for row in rows:
        records = [r for r in sweeps.read_metrics(workdir / row["trial"]) if "loss" in r]
        curves.plot([r["step"] for r in records], [r["loss"] for r in records], label=row["trial"])
    curves.set(xlabel="step", ylabel="training loss")
    if rows:
        curves.legend(fontsize=6)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    (workdir / "summary.png").write_bytes(image.getvalue())
    plt.close(figure)


def summarize(workdir: str) -> list[str]:
    """Writes summary.{csv,md,png} in `workdir`; returns the Markdown table's lines to print."""
    named = sweeps.read_sweep(workdir)
    keys = list(dict.fromkeys(k for overrides in named.values() for k in overrides))
    rows = [trial_row(workdir, name, {k: o.get(k, "") for k in keys}) for name, o in named.items()]
    warnings = edge_warnings(rows, keys)
    write_table(workdir, rows, warnings)
    write_plot(workdir, rows, keys)
    text = (workdir_path(workdir) / "summary.md").read_text()
    return text.splitlines() + [f"wrote {workdir}/summary.{{csv,md,png}}"]
