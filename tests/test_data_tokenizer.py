"""Tokenizer: the bundled model, in-graph tokenization, and the training command."""

import os
import sysconfig

import pytest
import tensorflow as tf

from data.tokenizer import DEFAULT_TOKENIZER, Tokenizer, main
from errors import UserError

CODE = "def f(x):\n\treturn x  # naïve ✓ 漢字 🙂\n\n    pass\n"


@pytest.fixture(scope="module")
def bundled():
    return Tokenizer()


def test_bundled_tokenizer_is_small_8k_bpe_with_fixed_ids(bundled):
    assert bundled.path == DEFAULT_TOKENIZER and os.path.isabs(bundled.path)
    assert bundled.vocab_size == 8000
    assert os.path.getsize(DEFAULT_TOKENIZER) < 1_000_000
    sp = bundled._sp
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("<0xF0>") > 3  # byte fallback


def test_encode_decode_round_trips_code_and_unseen_characters(bundled):
    ids = bundled.encode(CODE)
    assert 3 not in ids  # nothing unknown: byte fallback
    assert bundled.decode(ids) == CODE


def test_in_graph_tokenization_matches_python_and_appends_eos(bundled):
    texts = [CODE, "x = 1", ""]
    ragged = bundled.tf_tokenize(tf.constant(texts))
    assert ragged.to_list() == [bundled.encode(t) + [2] for t in texts]


def _corpus(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("os.py", "glob.py", "textwrap.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            (tmp_path / (name + ".txt")).write_text(f.read())
    return str(tmp_path / "*.txt")


@pytest.mark.parametrize("model_type,vocab_size", [("bpe", 400), ("unigram", 400), ("char", 120)])
def test_training_command_writes_model_with_fixed_ids(tmp_path, model_type, vocab_size):
    output = str(tmp_path / "out" / f"{model_type}.model")
    main(
        [
            f"--input={_corpus(tmp_path)}",
            f"--vocab_size={vocab_size}",
            f"--model_type={model_type}",
            f"--output={output}",
        ]
    )
    tok = Tokenizer(output)
    sp = tok._sp
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert not os.path.exists(output.replace(".model", ".vocab"))
    has_bytes = sp.piece_to_id("<0xF0>") != sp.unk_id()
    assert has_bytes == (model_type != "char")
    if model_type == "char":
        assert tok.vocab_size <= vocab_size
    else:
        assert tok.vocab_size == vocab_size
        assert tok.decode(tok.encode(CODE)) == CODE


def test_missing_tokenizer_file_names_the_field(tmp_path):
    with pytest.raises(UserError, match=r"data.tokenizer: no file .*nope.model"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_file_that_is_not_a_model_is_rejected(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer(str(bad))
