"""Evaluation: eval.py's numbers equal training's, bits per byte by hand, lm-eval's Hugging
Face backend agrees with the adapter, tasks inside training, clear errors. SFT evaluation
(response loss, generation and its metrics) is in test_eval_sft.py, over this file's run."""

import json
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network (lm-eval, datasets)
os.environ["HF_DATASETS_OFFLINE"] = "1"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from checkpoints.read import load_sampler  # noqa: E402
from configs.json_file import get_config as config_from_json  # noqa: E402
from config_schema import defaults  # noqa: E402
from data.hf_tokenizer import load_tokenizer  # noqa: E402
from errors import UserError  # noqa: E402
from evaluation.config import EvalConfig  # noqa: E402
from evaluation.run import evaluate_workdir  # noqa: E402
from tests.test_data_sources import tfds_dir  # noqa: E402, F401 -- a local TFDS dataset
from tests.test_train_loop import REPO, small_config  # noqa: E402
from training import loop  # noqa: E402
from training.config import validate_config  # noqa: E402

ONE_DOCUMENT = "def add(a, b):  # é ✓\n    return a + b\n"  # one 32-token window; not ASCII
SFT_EXAMPLES = [
    {"prompt": "reverse: a b c", "response": "c b a"},
    {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]},
    {"prompt": "é?", "response": "✓ é"},
]
MC_ITEMS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", " json"], "answer": 1},
    {"question": "class A:\n   ", "choices": [" pass", " return"], "answer": 0},
]


def read_records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, files): 3 steps on text files; extra text and SFT examples are scored inside
    training."""
    root = tmp_path_factory.mktemp("eval")
    files = {name: str(root / f"{name}.txt") for name in ("train", "valid", "extra", "one")}
    files["sft"] = str(root / "sft.jsonl")
    with open(files["sft"], "w") as f:
        f.writelines(json.dumps(example) + "\n" for example in SFT_EXAMPLES)
    sources = {"train": json.__file__, "valid": math.__doc__ or "", "extra": subprocess.__file__}
    for name, source in sources.items():
        text = open(source).read() if os.path.isfile(source) else source
        with open(files[name], "w") as f:
            f.write(text[:6000])
    with open(files["one"], "w") as f:
        f.write(ONE_DOCUMENT)
    workdir = str(root / "run")
    config = small_config(
        **{
            "data.source": "files",
            "data.train_files": files["train"],
            "data.eval_files": files["valid"],
            "train.num_steps": 3,
            "train.eval_every": 0,
            "eval.text_files": files["extra"],
            "eval.sft_file": files["sft"],
            "eval.max_new_tokens": 6,
        }
    )
    loop.train(config, workdir)
    return workdir, files


def test_eval_command_equals_the_training_evaluation(trained, tmp_path):
    """Another mesh, the same numbers: validation data and the extra text files."""
    workdir, files = trained
    output = str(tmp_path / "eval.json")
    result = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={workdir}", "--mesh=2,2,2", f"--output={output}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[1].split()[0] == "validation"
    with open(output) as f:
        report = json.load(f)
    assert report["step"] == 3
    ours = report["results"]["validation"]
    logged = read_records(workdir)[-1]
    assert logged["step"] == 3 and ours["tokens"] == logged["eval_tokens"] > 0
    assert ours["bytes"] == logged["eval_bytes"] > ours["tokens"]
    for name in ("loss", "perplexity", "bits_per_byte"):
        np.testing.assert_allclose(ours[name], logged[f"eval_{name}"], rtol=1e-5)

    text = evaluate_workdir(workdir, text_files=files["extra"])["results"][files["extra"]]
    for name in ("loss", "bits_per_byte", "tokens"):
        np.testing.assert_allclose(text[name], logged[f"text_{name}"], rtol=1e-5)


def test_bits_per_byte_by_hand(trained):
    workdir, files = trained
    one_device = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    sampler, run = load_sampler(workdir, one_device, devices=jax.devices()[:1])
    config = run.config
    tokenizer = load_tokenizer(config.data.tokenizer)
    ids = np.array(tokenizer.encode(ONE_DOCUMENT) + [tokenizer.eos_id])
    assert len(ids) <= config.data.seq_len + 1
    logits = sampler.model.apply({"params": sampler.params}, ids[None, :-1])[0]
    logprobs = jax.nn.log_softmax(np.asarray(logits, np.float64))
    nats = -float(sum(logprobs[t, ids[t + 1]] for t in range(len(ids) - 1)))
    # The targets cover every byte but those of the first token (eos decodes to nothing).
    num_bytes = len(ONE_DOCUMENT.encode()) - len(tokenizer.decode(ids[:1]).encode())

    report = evaluate_workdir(
        workdir, text_files=files["one"], mesh="1,1,1", devices=jax.devices()[:1]
    )
    ours = report["results"][files["one"]]
    assert (ours["tokens"], ours["bytes"]) == (len(ids) - 1, num_bytes)
    np.testing.assert_allclose(ours["loss"], nats / (len(ids) - 1), rtol=1e-5)
    np.testing.assert_allclose(ours["bits_per_byte"], nats / math.log(2) / num_bytes, rtol=1e-5)


def test_lm_eval_adapter_matches_lm_evals_hugging_face_backend(trained, tmp_path):
    """A local multiple-choice task (JSONL, no download) and each document's rolling
    log-likelihood: the adapter on the checkpoint, lm-eval's HFLM on the exported model, the
    same numbers, with HFLM's default empty-context prefix (the tokenizer's bos, which differs
    from its eos here) and with `prefix_token_id` = eos."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_adapter import MeshLM
    from tools.export_hf import export_hf

    workdir, files = trained
    exported = str(tmp_path / "hf")
    export_hf(workdir, exported, 2**30)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    (tmp_path / "task.yaml").write_text(
        "task: meshlm_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {items}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    ours = MeshLM(workdir, batch_size=4)
    theirs = HFLM(pretrained=exported, device="cpu", batch_size=4, dtype="float32")
    assert ours.prefix_token_id == theirs.prefix_token_id != ours.eot_token_id
    tasks = TaskManager(include_path=str(tmp_path))

    def loglikelihoods(model):
        out = lm_eval.simple_evaluate(
            model=model, tasks=["meshlm_local_mc"], task_manager=tasks, bootstrap_iters=0
        )
        samples = sorted(out["samples"]["meshlm_local_mc"], key=lambda s: s["doc_id"])
        return np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples], dtype=object)

    mc_ours, mc_theirs = loglikelihoods(ours), loglikelihoods(theirs)
    assert len(mc_ours) == len(MC_ITEMS)
    for a, b in zip(mc_ours, mc_theirs):
        np.testing.assert_allclose(np.array(a, float), np.array(b, float), atol=1e-4)

    long_text = open(files["extra"]).read()[:400]  # longer than max_length: several windows
    assert len(ours.tok_encode(long_text)) > 2 * ours.max_length
    rolling = [
        Instance("loglikelihood_rolling", {}, (text,), 0)
        for text in (long_text, ONE_DOCUMENT, "import os", "x")
    ]
    with_bos = ours.loglikelihood_rolling(rolling)
    np.testing.assert_allclose(with_bos, theirs.loglikelihood_rolling(rolling), rtol=1e-5)
    eos = ours.eot_token_id
    with_eos = MeshLM(workdir, batch_size=4, prefix_token_id=eos).loglikelihood_rolling(rolling)
    theirs_eos = HFLM(
        pretrained=exported, device="cpu", batch_size=4, dtype="float32", prefix_token_id=eos
    )
    np.testing.assert_allclose(with_eos, theirs_eos.loglikelihood_rolling(rolling), rtol=1e-5)
    assert all(a != b for a, b in zip(with_bos, with_eos))  # the prefix shows in every item
    with pytest.raises(UserError, match=r"prefix_token_id=99999: not a token id of .*; give"):
        MeshLM(workdir, prefix_token_id=99999)

    settings = [{"until": ["\n\n"], "max_gen_toks": 8}, {"until": ["("], "max_gen_toks": 6}]
    requests = [
        Instance("generate_until", {}, (prompt, kwargs), 0)
        for prompt in ("import", "def main")
        for kwargs in settings
    ]
    generated = ours.generate_until(requests)
    assert generated == theirs.generate_until(requests) and any(generated)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(workdir="/no/such/run"), "has no checkpoint"),
        (dict(step=99), r"--step=99: .* has no such step; it has \[3\]"),
        (dict(text_files="/no/such/*.txt"), r"--text_files: no files match '/no/such/\*.txt'"),
        (dict(tfds="nosplit"), r"--tfds='nosplit': give NAME:SPLIT"),
        (dict(sft_file="/no/such.jsonl"), r"/no/such.jsonl: no such SFT file"),
        (dict(sft_file="BAD"), r"bad.jsonl:2: not JSON"),
    ],
)
def test_mistakes_are_one_clear_error(trained, tmp_path, options, message):
    if options.get("sft_file") == "BAD":
        options["sft_file"] = str(tmp_path / "bad.jsonl")
        with open(options["sft_file"], "w") as f:
            f.write(json.dumps(SFT_EXAMPLES[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=message):
        evaluate_workdir(**{"workdir": trained[0], **options})


def test_a_config_json_without_the_eval_section_still_loads(trained, tmp_path):
    """config.json files written before `eval` or `optimizer.keep_sparsity` existed get their
    defaults (configs/json_file.py), so such runs take today's overrides."""
    with open(os.path.join(trained[0], "config.json")) as f:
        saved = json.load(f)
    del saved["eval"], saved["optimizer"]["keep_sparsity"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_from_json(str(tmp_path / "config.json"))
    validate_config(config, jax.device_count())
    assert config.optimizer.keep_sparsity is False
    assert config.optimizer.learning_rate == saved["optimizer"]["learning_rate"]
    assert (
        config.eval.to_dict() == defaults(EvalConfig) and config.model.to_dict() == saved["model"]
    )


def test_a_bad_sft_file_stops_training_before_anything_is_written(trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no response"}\n')
    workdir = str(tmp_path / "run")
    config = small_config(**{"data.train_files": trained[1]["train"], "eval.sft_file": str(bad)})
    config.data.update(source="files", eval_files=trained[1]["valid"])
    with pytest.raises(UserError, match=r"bad.jsonl:1: no 'response' string"):
        loop.train(config, workdir)
    assert not os.path.exists(workdir)


def test_a_tfds_split_is_scored_and_an_unknown_one_named(trained, tfds_dir):  # noqa: F811
    data_dir, _, valid = tfds_dir
    where = dict(tfds_text_key="body", tfds_data_dir=data_dir)
    report = evaluate_workdir(trained[0], tfds="local_text:validation", **where)
    scored = report["results"]["tfds:local_text:validation"]
    assert scored["bytes"] < sum(len(text) + 1 for text in valid) < 2 * scored["bytes"]
    with pytest.raises(UserError, match=r"--tfds=local_text:test: .*'test' is not a split"):
        evaluate_workdir(trained[0], tfds="local_text:test", **where)


def test_score_batches_adds_every_batchs_sums():
    """score_batches reads each batch's sums one batch late: every batch, the last one and a
    masked LM's hits included, is counted once (a stub step: exact sums, no model)."""
    import types

    from evaluation.evaluator import score_batches

    def eval_step(params, batch, target_bytes):
        weights = batch["weights"]
        return {
            "ce_sum": np.float32((batch["targets"] * weights).sum()),
            "weight_sum": np.float32(weights.sum()),
            "correct_sum": np.float32(weights[:, 0].sum()),
            "bytes": np.int32(target_bytes.sum()),
        }

    tokenizer = types.SimpleNamespace(decode=lambda ids: "x" * len(ids))  # 1 byte per token
    batches = [
        {"targets": np.full((2, 3), k, np.int32), "weights": np.ones((2, 3), np.float32)}
        for k in (1, 2, 3)
    ]
    batches[2]["weights"][1] = 0  # a padding row
    result = score_batches(eval_step, lambda placed: placed, None, batches, tokenizer)
    assert result["tokens"] == 6 + 6 + 3 and result["bytes"] == 15
    assert result["loss"] == (6 * 1 + 6 * 2 + 3 * 3) / 15
    assert result["accuracy"] == (2 + 2 + 1) / 15
