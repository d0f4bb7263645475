"""Hugging Face import and export from the command line: round trips, parity, bad input."""

import json
import logging
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints.read import load_params, newest_step_meta
from configs import finetune_sft
from configs.json_file import get_config as config_from_json
from data import sft
from data.hf_tokenizer import HFTokenizer, load_tokenizer, tokenizer_from_sentencepiece
from data.tokenizer import DEFAULT_TOKENIZER
from errors import UserError
from model import Transformer
from model.config import ModelConfig
from model.hf import config_to_hf, param_shapes
from tests.helpers import LLAMA_STYLE, TINY_MODEL, random_batch, setup, tiny_config
from tests.test_hf_parity import POSITIONS, VOCAB, gpt2, llama, random_model
from tools import export_hf, import_hf
from training import loop
from training.checkpoint import Checkpointer

WORDS = ["<|endoftext|>"] + [f"w{i}" for i in range(60)]  # id 0 is the models' eos
TEXTS = [
    "def f(x):\n    return  x + 1  # héllo wörld 日本語 🤖\n\n\tdone 12345",
    "class A:\n    pass\n" * 3,
    "</s> <s> <unk> <pad> are text here",
    " leading space, trailing space ",
    "",
]


def save_hf(model, directory, tokenizer=True, **save_kwargs) -> str:
    """`save_pretrained` plus a small word-level tokenizer.json whose eos only config.json names."""
    model.save_pretrained(directory, **save_kwargs)
    if tokenizer:
        words = Tokenizer(models.WordLevel(dict(zip(WORDS, range(len(WORDS)))), unk_token="w0"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        words.add_special_tokens([WORDS[0]])
        words.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": POSITIONS}, f
            )
    return str(directory)


def tensors(directory) -> dict:
    files = [f for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
    return {k: v for f in files for k, v in load_file(os.path.join(directory, f)).items()}


def meshlm_params(workdir):
    """The newest checkpoint's config (float32 compute) and params, as sample.py loads them."""
    step, meta = newest_step_meta(workdir)
    config = ModelConfig.from_dict({**meta["config"]["model"], "dtype": "float32"})
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), param_shapes(config)
    )
    return config, load_params(workdir, step, abstract)


def assert_exported_logits_match(workdir, out_dir):
    config, params = meshlm_params(workdir)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.max_seq_len))
    ours = np.asarray(jax.jit(Transformer(config).apply)({"params": params}, tokens))
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(tokens)).logits.numpy()
    assert theirs.std() > 0.01  # not degenerate
    np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)


@pytest.mark.parametrize(
    "name, hf_config, import_shards, export_shard_bytes",
    [
        ("gpt2_tied", gpt2(), "20KB", 2**30),  # sharded import
        ("llama_gqa_untied", llama(num_key_value_heads=2, tie_word_embeddings=False), None, 30000),
        ("llama_tied", llama(tie_word_embeddings=True, rope_theta=5e5), None, 2**30),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, name, hf_config, import_shards, export_shard_bytes):
    model = random_model(hf_config)
    hf_dir = save_hf(
        model, tmp_path / "hf", **({"max_shard_size": import_shards} if import_shards else {})
    )
    assert os.path.isfile(os.path.join(hf_dir, import_hf.INDEX)) == bool(import_shards)
    workdir, out_dir = str(tmp_path / "workdir"), str(tmp_path / "out")
    import_hf.main([hf_dir, f"--workdir={workdir}"])
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["tokenizer"] == os.path.join(
            workdir, "tokenizer", "tokenizer.json"
        )
    export_hf.export_hf(workdir, out_dir, export_shard_bytes)
    assert os.path.isfile(os.path.join(out_dir, export_hf.INDEX)) == (export_shard_bytes < 2**30)

    original, exported = tensors(hf_dir), tensors(out_dir)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key

    with open(os.path.join(out_dir, "config.json")) as f:
        written = json.load(f)
    for key, value in hf_config.to_dict().items():
        if key in written and value is not None and key not in ("transformers_version", "dtype"):
            assert written[key] == value, key
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokens = torch.as_tensor(np.random.default_rng(1).integers(0, VOCAB, (2, POSITIONS)))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)

    # The tokenizer comes back as it went in, with the eos that only config.json named.
    with (
        open(os.path.join(hf_dir, "tokenizer.json")) as a,
        open(os.path.join(out_dir, "tokenizer.json")) as b,
    ):
        assert a.read() == b.read()
    text = "w3 w5 w7 w1"
    assert AutoTokenizer.from_pretrained(out_dir)(text)["input_ids"] == [4, 6, 8, 2]
    ours = load_tokenizer(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    assert (ours.encode(text), ours.eos_id, ours.decode([4, 6, 0])) == ([4, 6, 8, 2], 0, "w3 w5")


def test_a_model_trained_by_meshlm_exports_to_transformers(tmp_path):
    """GPT-2 style, three steps of meshlm's train step, saved as train.py saves it, with the
    bundled sentencepiece tokenizer: logits and token ids agree with transformers."""
    config = tiny_config(vocab_size=8192, max_seq_len=32)
    _, state, train_step = setup(config, mesh_shape=(1, 1, 1))
    for seed in range(3):
        state, _ = train_step(state, random_batch(config, seed=seed))
    workdir, out_dir = str(tmp_path / "run"), str(tmp_path / "out")
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    model_fields = ModelConfig.from_dict(config.model).weight_fields()
    checkpointer.save(3, state, {}, json.loads(config.to_json_best_effort()), model_fields)
    checkpointer.close()
    export_hf.main([f"--workdir={workdir}", out_dir])
    assert_exported_logits_match(workdir, out_dir)

    theirs = AutoTokenizer.from_pretrained(out_dir)
    ours = load_tokenizer(DEFAULT_TOKENIZER)
    converted = HFTokenizer(os.path.join(out_dir, "tokenizer.json"))
    sources = [pathlib.Path(m.__file__).read_text("utf-8") for m in (json, logging, shutil)]
    for text in TEXTS + sources:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids == converted.encode(text), text[:40]
        assert theirs.decode(ids) == ours.decode(ids) == converted.decode(ids), text[:40]
    special = [theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id]
    assert special == [0, 1, 2, 3]
    with open(os.path.join(out_dir, "config.json")) as f:
        written = json.load(f)
    assert [written[f"{k}_token_id"] for k in ("pad", "bos", "eos")] == [0, 1, 2]


def test_training_continues_from_an_imported_model(tmp_path, monkeypatch, caplog):
    """Llama with a sentencepiece tokenizer.model: train.py's loop resumes the imported params
    with a fresh optimizer state and the data from the start; the result exports again."""
    hf_config = llama(num_key_value_heads=2, tie_word_embeddings=False)
    hf_config.vocab_size = 8000  # the bundled sentencepiece model's
    hf_dir = save_hf(random_model(hf_config), tmp_path / "hf", tokenizer=False)
    shutil.copyfile(DEFAULT_TOKENIZER, os.path.join(hf_dir, "tokenizer.model"))
    workdir = str(tmp_path / "workdir")
    import_hf.main([hf_dir, f"--workdir={workdir}", "--dtype=float32"])
    _, imported = meshlm_params(workdir)

    seen = {}
    original = loop.Trainer.resumed_state

    def spy(trainer, restored):
        seen["data_state"] = restored.data_state
        state = original(trainer, restored)
        seen["params"], seen["step"] = jax.device_get(state.params), int(state.step)
        return state

    monkeypatch.setattr(loop.Trainer, "resumed_state", spy)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(pathlib.Path(m.__file__).read_text("utf-8") for m in (json, shutil)))
    config = config_from_json(os.path.join(workdir, "config.json"))
    config.data.update(source="files", train_files=str(corpus), eval_files=str(corpus))
    config.data.eval_max_batches = 1
    config.train.update(num_steps=2, global_batch_size=8, eval_every=0)
    config.optimizer.warmup_steps = 0
    with caplog.at_level(logging.INFO):
        assert loop.train(config, workdir)["step"] == 2
    assert "holds parameters only" in caplog.text
    assert seen["step"] == 0 and seen["data_state"] is None
    jax.tree.map(np.testing.assert_array_equal, seen["params"], jax.device_get(imported))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "2"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))

    out_dir = str(tmp_path / "out")
    export_hf.main([f"--workdir={workdir}", out_dir])
    assert_exported_logits_match(workdir, out_dir)


@pytest.fixture(scope="module")
def good_hf_dir(tmp_path_factory):
    return save_hf(random_model(llama(num_key_value_heads=2)), tmp_path_factory.mktemp("hf"))


def _rewrite_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = {**json.load(f), **changes}
    with open(path, "w") as f:
        json.dump(config, f)


def _drop_tensor(directory):
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})


def _add_tensor(directory):
    path = os.path.join(directory, "model.safetensors")
    save_file(
        {**load_file(path), "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}, path
    )


BAD_HF_DIRS = {
    "no config.json": (lambda d: os.remove(os.path.join(d, "config.json")), "has no config.json"),
    "architecture": (
        lambda d: _rewrite_config(d, model_type="mistral"),
        "Unsupported Hugging Face model_type='mistral'",
    ),
    "head": (
        lambda d: _rewrite_config(d, architectures=["LlamaForSequenceClassification"]),
        r"architectures=\['LlamaForSequenceClassification'\] is not supported",
    ),
    "rope scaling": (
        lambda d: _rewrite_config(
            d, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
        ),
        r"rope scaling \(rope_type='llama3'\) is not supported",
    ),
    "no safetensors": (
        lambda d: os.rename(
            os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin")
        ),
        "has no model.safetensors or model.safetensors.index.json",
    ),
    "missing tensor": (_drop_tensor, r"has no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    "extra tensor": (
        _add_tensor,
        r"1 tensor\(s\) .* no place for, e\.g\. \['model\.layers\.0\.self_attn\.q_norm",
    ),
    "wrong shape": (
        lambda d: _rewrite_config(d, intermediate_size=128),
        r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\), expected \(128, 64\)",
    ),
    "no tokenizer": (
        lambda d: os.remove(os.path.join(d, "tokenizer.json")),
        "has no tokenizer.json or tokenizer.model",
    ),
}


@pytest.mark.parametrize("case", BAD_HF_DIRS)
def test_bad_hf_directories_get_one_clear_error(tmp_path, good_hf_dir, case):
    spoil, message = BAD_HF_DIRS[case]
    hf_dir = shutil.copytree(good_hf_dir, tmp_path / "hf")
    spoil(hf_dir)
    workdir = tmp_path / "workdir"
    with pytest.raises(SystemExit) as exit_info:
        import_hf.main([str(hf_dir), f"--workdir={workdir}"])
    assert str(exit_info.value.code).startswith("error: ")
    assert "\n" not in str(exit_info.value.code)
    assert re.search(message, str(exit_info.value.code))
    assert not workdir.exists()  # nothing is written before everything is checked


def test_workdirs_that_cannot_be_imported_into_or_exported_from(tmp_path, good_hf_dir):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="error: .*busy' exists and is not empty"):
        import_hf.main([good_hf_dir, f"--workdir={tmp_path / 'busy'}"])
    with pytest.raises(SystemExit, match="error: .*has no checkpoint.*train first.*import_hf"):
        export_hf.main([f"--workdir={tmp_path / 'none'}", str(tmp_path / "out")])
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()

    workdir = str(tmp_path / "imported")
    import_hf.main([good_hf_dir, f"--workdir={workdir}"])
    with pytest.raises(SystemExit, match="error: .*busy' exists and is not empty"):
        export_hf.main([f"--workdir={workdir}", str(tmp_path / "busy")])
    step, meta = newest_step_meta(workdir)
    assert (step, meta["params_only"], meta["model"]["num_kv_heads"]) == (0, True, 2)
    other = ModelConfig.from_dict({**meta["config"]["model"], "mlp_dim": 64})
    with pytest.raises(UserError, match="parameters of another shape"):
        load_params(workdir, step, param_shapes(other))


@pytest.mark.parametrize(
    "model, message",
    [
        (
            dict(TINY_MODEL, position_embedding="rope"),
            r"none of .* GPT2LMHeadModel .*this model has model\.position_embedding='rope'\).*"
            r"LlamaForCausalLM .*this model has model\.norm='layernorm', model\.mlp_activation='gelu'",
        ),
        (
            dict(TINY_MODEL, num_kv_heads=4),
            r"GPT2LMHeadModel config cannot express model\.num_kv_heads=4",
        ),
        (dict(TINY_MODEL, **LLAMA_STYLE, head_dim=8), None),  # Llama can: head_dim is in its config
    ],
)
def test_models_transformers_cannot_express_are_refused(model, message):
    config = ModelConfig(**model)
    if message is None:
        assert config_to_hf(config)["head_dim"] == 8
    else:
        with pytest.raises(UserError, match=message):
            config_to_hf(config)


def test_only_sentencepiece_bpe_converts_to_a_tokenizer_json():
    with open(DEFAULT_TOKENIZER, "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    proto.normalizer_spec.add_dummy_prefix = True
    with pytest.raises(UserError, match=r"differs in \['model_type', 'add_dummy_prefix'\]"):
        tokenizer_from_sentencepiece(proto)


CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
TOOLS = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(
    "where, template",
    [
        ("saved", CHAT),  # transformers 5 writes chat_template.jinja
        ("saved", {"default": CHAT, "tool_use": TOOLS}),  # and chat_templates/tool_use.jinja
        ("tokenizer_config.json", CHAT),  # older transformers (and many hub models)
        ("tokenizer_config.json", [{"name": "default", "template": CHAT}]),
    ],
    ids=["jinja", "named-jinja", "config", "named-config"],
)
def test_chat_templates_survive_import_sft_and_export(
    tmp_path, good_hf_dir, caplog, where, template
):
    hf_dir = tmp_path / "hf"
    shutil.copytree(good_hf_dir, hf_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    hf_tokenizer.eos_token = WORDS[0]
    if where == "saved":
        hf_tokenizer.chat_template = template
    hf_tokenizer.save_pretrained(hf_dir)
    if where == "tokenizer_config.json":
        config = json.loads((hf_dir / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tokenizer.chat_template  # what transformers sees, the import must keep

    workdir, out_dir = str(tmp_path / "w"), str(tmp_path / "out")
    import_hf.import_hf(str(hf_dir), workdir, "float32", "float32")
    preset = finetune_sft.get_config(workdir)
    assert preset.data.sft_template == "hf"
    messages = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    with caplog.at_level(logging.INFO):
        chat = sft.load_template(preset.data.sft_template, preset.data.tokenizer)
    assert chat.render(messages, add_generation_prompt=False) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert "SFT template: hf (the chat template of" in caplog.text

    export_hf.export_hf(workdir, out_dir, 10**9)
    assert AutoTokenizer.from_pretrained(out_dir).chat_template == hf_tokenizer.chat_template


def test_sft_says_when_plain_is_used_and_why(tmp_path, caplog):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with caplog.at_level(logging.INFO):
        sft.load_template("plain", str(tmp_path / "tokenizer.json"))
    assert "SFT template: plain (the tokenizer has no chat template)" in caplog.text
    (tmp_path / "chat_template.jinja").write_text(CHAT)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        sft.load_template("plain", str(tmp_path / "tokenizer.json"))
    plain = [r.levelname for r in caplog.records if "SFT template: plain" in r.message]
    assert plain == ["WARNING"]
    assert "has a chat template" in caplog.text
