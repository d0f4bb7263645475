"""Every notebook in notebooks/ runs top to bottom (shortened), and none is committed with outputs.

Each notebook has one cell tagged `parameters` (papermill's convention); the test
inserts a cell after it that overrides those values with SHORTEN's, so a broken
cell, import or API change fails here. A notebook without a SHORTEN entry fails too.
"""

import concurrent.futures
import glob
import os

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.test_readme import TRAIN_OVERRIDES
from tests.test_train_loop import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))

# The default config shrunk exactly as for the README's commands, so that the
# quickstart's compiles are shared with theirs (tests/conftest.py: one compilation cache).
SMALL_OVERRIDES = {k: v for k, v in TRAIN_OVERRIDES.items() if k != "train.num_steps"}

# notebook name -> the parameter values that make it short; {tmp} is a fresh directory.
SHORTEN = {
    "finetune": {
        "TINY_RANDOM_MODEL": True,
        "WORKDIR": "{tmp}/finetune",
        "NUM_STEPS": 4,
        "OVERRIDES": {"optimizer.warmup_steps": 2},  # within NUM_STEPS
        "MAX_NEW_TOKENS": 8,
    },
    "quickstart": {
        "NUM_STEPS": TRAIN_OVERRIDES["train.num_steps"],
        "WORKDIR": "{tmp}/quickstart",
        "OVERRIDES": SMALL_OVERRIDES,
        "MAX_NEW_TOKENS": 8,  # within the shrunk model's max_seq_len
        "SHOW_TENSORBOARD": False,
    },
    "sharding": {
        "MEMORY_OVERRIDES": {
            "model.num_layers": 2,
            "model.embed_dim": 48,
            "model.mlp_dim": 96,
            "model.vocab_size": 512,
            "model.max_seq_len": 64,
            "data.seq_len": 64,
            "train.global_batch_size": 8,
            "train.num_microbatches": 1,
        },
    },
}


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def shortened(path: str, tmp: str) -> nbformat.NotebookNode:
    """The notebook with a cell overriding its `parameters` cell's values."""
    notebook = nbformat.read(path, as_version=4)
    name = _name(path)
    assert name in SHORTEN, f"add an entry for notebooks/{name}.ipynb to SHORTEN in {__file__}"
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}.ipynb: tag exactly one code cell `parameters`"
    values = {
        key: value.format(tmp=tmp) if isinstance(value, str) else value
        for key, value in SHORTEN[name].items()
    }
    source = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
    return notebook


def run(path: str, tmp: str) -> str:
    """Executes the shortened notebook; '' or the failing cell's error."""
    notebook = shortened(path, os.path.join(tmp, _name(path)))
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(path)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:  # names the cell and holds its traceback
        return f"notebooks/{_name(path)}.ipynb: {error}"
    return ""


def test_notebooks_run(tmp_path):
    """All notebooks at once, one kernel each (a kernel mostly keeps one core busy)."""
    with concurrent.futures.ThreadPoolExecutor(len(NOTEBOOKS)) as pool:
        errors = [e for e in pool.map(lambda p: run(p, str(tmp_path)), NOTEBOOKS) if e]
    assert not errors, "\n\n".join(errors)


def test_notebooks_exist_and_are_committed_without_outputs():
    assert {_name(p) for p in NOTEBOOKS} >= {"finetune", "quickstart", "sharding"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for number, cell in enumerate(notebook.cells, 1):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{os.path.relpath(path, REPO)} cell {number} has outputs: clear all outputs "
                    "(Jupyter or Colab: Edit > Clear all outputs) and save it again"
                )
