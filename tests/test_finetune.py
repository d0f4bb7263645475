"""Fine-tuning: SFT examples (JSONL, templates, response-only loss weights, packing) and
runs that start from another workdir's checkpoint (train.init_from)."""

import json
import logging
import math
import os
import random
import shutil

import jax
import numpy as np
import pytest

from checkpoints.write import save_params
from configs import finetune_sft
from data import sft
from data.pipeline import make_train_iterator
from data.tokenizer import train_tokenizer
from errors import UserError
from evaluation.run import evaluate_workdir
from tests.helpers import tiny_config
from training.config import validate_config
from training.init_from import initial_checkpoint
from training.loop import train
from training.step import make_eval_step
from training.trainer import Trainer

ALPHABET = "abcd"


def reversal_examples(path, count, seed):
    """The synthetic task: the response is the prompt reversed."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3)))
            f.write(json.dumps({"prompt": prompt, "response": prompt[::-1]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A character tokenizer and train/eval JSONL files of the reversal task."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = train_tokenizer(
        [f"User: Assistant: {ALPHABET}\n"],
        str(root / "chars.model"),
        vocab_size=40,
        model_type="char",
    )
    return {
        "root": root,
        "tokenizer": tokenizer,
        "train": reversal_examples(root / "train.jsonl", 512, seed=0),
        "eval": reversal_examples(root / "eval.jsonl", 64, seed=1),
    }


def sft_config(files, **train):
    # The model's vocabulary is the tokenizer's: a random model then only samples ids it has.
    config = tiny_config(max_seq_len=32, vocab_size=files["tokenizer"].vocab_size, num_heads=2)
    config.data.update(
        source="sft",
        sft_file=files["train"],
        sft_eval_file=files["eval"],
        tokenizer=files["tokenizer"].path,
        seq_len=32,
    )
    config.train.update(global_batch_size=16, eval_every=0, log_every=1, **train)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


def read_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_only_response_tokens_carry_loss_weight(files):
    config = sft_config(files)
    tokenizer = files["tokenizer"]
    batch = next(make_train_iterator(config.data, seed=0, global_batch_size=16))
    runs = 0
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], weights > 0, [0]])))
        for start, end in zip(edges[::2], edges[1::2]):  # each run of weighted targets
            prompt = tokenizer.decode(inputs[: start + 1]).rsplit("User: ", 1)[1]
            assert prompt.endswith("\nAssistant: ")
            assert targets[end - 1] == tokenizer.eos_id  # the eos ending the response is learned
            response = tokenizer.decode(targets[start : end - 1])
            assert response == prompt.removesuffix("\nAssistant: ")[::-1]
            runs += 1
    assert runs >= 16  # every row holds at least one whole example

    # Through the real loss: targets under weight 0 (prompts, template, padding) do not count.
    trainer = Trainer(config)
    params = trainer.init_state().params
    eval_step = make_eval_step(trainer.model, trainer.mesh, trainer.rules, trainer.shardings.params)

    def loss(targets):
        placed = trainer.to_global({**batch, "targets": targets, "bytes": 0 * targets})
        row_bytes = placed.pop("bytes")
        out = eval_step(params, placed, row_bytes)
        return float(out["ce_sum"])

    prompt = batch["targets"].copy()
    prompt[batch["weights"] == 0] = (prompt[batch["weights"] == 0] + 1) % tokenizer.vocab_size
    response = batch["targets"].copy()
    first = tuple(np.argwhere(batch["weights"] > 0)[0])
    response[first] = (response[first] + 1) % tokenizer.vocab_size
    assert loss(prompt) == loss(batch["targets"])
    assert loss(response) != loss(batch["targets"])


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class CodePoints:
    """A tokenizer whose ids are the characters' code points, so masks read as text."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_templates_mark_the_assistant_turns(tmp_path):
    turns = [("system", "be brief"), ("user", "hi"), ("assistant", "yo"), ("user", "bye")]
    turns.append(("assistant", "ciao"))
    example = {"messages": [{"role": r, "content": c} for r, c in turns]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    chat = sft.load_template("hf", str(tmp_path / "tokenizer.json"))
    expected = {
        "plain": (
            "System: be brief\nUser: hi\nAssistant: yo\0User: bye\nAssistant: ciao\0",
            "yo\0ciao\0",
        ),
        chat: (chat.render(example["messages"], False), "yo<|im_end|>\nciao<|im_end|>\n"),
    }
    for template, (text, learned) in expected.items():
        ids, mask = sft.encode_example(CodePoints(), example, template)
        assert "".join(map(chr, ids)) == text
        assert "".join(chr(i) for i, m in zip(ids, mask) if m) == learned
        prompt = text[: text.rindex("ciao")]
        assert "".join(map(chr, sft.prompt_ids(CodePoints(), example, template))) == prompt
    assert sft.reference(example) == "ciao"

    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="data.sft_template=hf: .* has no chat_template"):
        sft.load_template("hf", str(tmp_path / "tokenizer.json"))


def test_bad_jsonl_lines_name_file_and_line(files):
    path = files["root"] / "bad.jsonl"
    lines = [
        '{"prompt": "ab", "response": "ba"}',
        '{"prompt": "ab"}',
        "not json",
        "",
        '{"messages": [{"role": "user", "content": "ab"}]}',
        '{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]}',
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:2: no 'response' string; .*skip_bad_lines"):
        sft.read_jsonl(str(path))
    examples, num_bad = sft.read_jsonl(str(path), skip_bad_lines=True)
    assert num_bad == 3 and len(examples) == 2
    assert examples[0] == examples[1]  # prompt/response is a user and an assistant turn

    path.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(UserError, match=rf"^{path}:2: not JSON"):
        sft.read_jsonl(str(path))


def test_init_from_reshards_and_names_what_does_not_fit(files, tmp_path):
    config = sft_config(files)
    base = str(tmp_path / "base")
    other_mesh = config.copy_and_resolve_references()
    other_mesh.mesh.update(data=4, fsdp=2, tensor=1)  # params split over fsdp there
    saved = Trainer(other_mesh).init_state().params
    save_params(base, saved, {}, Trainer(config).model_config.weight_fields())

    config.train.init_from = base
    trainer = Trainer(config)
    restored = initial_checkpoint(
        config.train, trainer.abstract_state.params, trainer.model_config.weight_fields()
    )
    assert restored.step == 0 and restored.opt_state is None and restored.data_state is None
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape["data"] == 8

    def refused(config, match):
        trainer = Trainer(config)
        with pytest.raises(UserError, match=match):
            initial_checkpoint(
                config.train, trainer.abstract_state.params, trainer.model_config.weight_fields()
            )

    # The preset takes the model and tokenizer from the workdir it starts from.
    (tmp_path / "base" / "config.json").write_text(config.to_json_best_effort())
    preset = finetune_sft.get_config(base)
    preset.data.update(sft_file=files["train"], sft_eval_file=files["eval"])
    assert validate_config(preset, num_devices=8) == trainer.model_config
    assert (preset.train.init_from, preset.data.source, preset.data.sft_template) == (
        base,
        "sft",
        "plain",
    )

    wider = config.copy_and_resolve_references()
    wider.model.mlp_dim = 128
    refused(
        wider,
        r"model\.mlp_dim: 64 -> 128;.* layers/mlp/wi/kernel: \(\(2, 32, 64\).*\(\(2, 32, 128\)",
    )
    config.train.init_step = 7
    refused(config, r"train.init_step=7: .*has no such step; it has \[0\]")
    config.train.init_from = str(tmp_path / "missing")
    refused(config, r"train.init_from=.*missing.*: no such directory")


def exact_match(workdir, files) -> float:
    results = evaluate_workdir(workdir, sft_file=files["eval"], max_new_tokens=4)["results"]
    return results[f"sft:{files['eval']}"]["exact_match"]


def test_finetuning_learns_the_task_and_resumes_bit_for_bit(files, tmp_path, caplog):
    base = str(tmp_path / "base")
    config = sft_config(files, num_steps=300)
    trainer = Trainer(config)  # an initialised model, saved as tools/import_hf.py saves one
    config_dict = json.loads(config.to_json_best_effort())
    model_fields = trainer.model_config.weight_fields()
    save_params(base, trainer.init_state().params, config_dict, model_fields)
    config.train.init_from = base
    config.checkpoint.update(every_steps=150, async_save=False)
    whole = str(tmp_path / "whole")
    with caplog.at_level(logging.INFO):
        final = train(config, whole)
    assert f"Restored checkpoint at step 0 from train.init_from={base}" in caplog.text
    caplog.clear()
    losses = read_losses(whole)
    # Step 1's loss is the initial model's on response tokens; a model that ignores the
    # prompt cannot do better than guessing each letter (log 4).
    assert losses[1] > math.log(config.model.vocab_size) - 0.3  # about log(vocab) at init
    assert final["eval_loss"] < math.log(len(ALPHABET)) - 0.3
    assert final["eval_loss"] < losses[1] - 1.5
    assert exact_match(whole, files) > exact_match(base, files) + 0.05  # 0.14 vs 0.0 seen

    resumed = str(tmp_path / "resumed")
    shutil.copytree(whole, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "300"))
    with caplog.at_level(logging.INFO):
        again = train(config, resumed)
    assert "train.init_from ignored" in caplog.text
    resumed_losses = read_losses(resumed)
    assert [resumed_losses[s] for s in range(151, 301)] == [losses[s] for s in range(151, 301)]
    assert again["eval_loss"] == final["eval_loss"]
