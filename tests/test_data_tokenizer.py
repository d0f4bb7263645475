"""Tokenizer: the bundled model, in-graph tokenization, and the training command."""

import os
import subprocess
import sys
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


@pytest.mark.parametrize("name", ["tok", "tok.model"])
def test_output_path_with_or_without_model_suffix(tmp_path, capsys, name):
    (tmp_path / "a.txt").write_text("some text to learn from\n" * 50)
    main(
        [
            f"--input={tmp_path}/a.txt",
            "--model_type=char",
            "--vocab_size=30",
            f"--output={tmp_path}/new/{name}",
        ]
    )
    assert Tokenizer(str(tmp_path / "new" / "tok.model")).vocab_size <= 30
    assert f"wrote {tmp_path}/new/tok.model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--vocab_size=0"], "--vocab_size=0"),
        (["--vocab_size=-5"], "--vocab_size=-5"),
        (["--vocab_size=100", "--model_type=bpe"], "--vocab_size=100"),  # < 256 byte pieces
        (["--vocab_size=100000", "--model_type=bpe"], "--vocab_size"),  # more than the text has
        (["--max_sentences=0"], "--max_sentences=0"),
        (["--input=/no/such/dir/*.txt"], "--input"),
        (["--input={empty}"], "--input: no text"),
    ],
)
def test_bad_command_line_values_are_one_line_and_write_nothing(tmp_path, flags, named):
    (tmp_path / "a.txt").write_text("some text to learn from\n" * 50)
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [f"--input={tmp_path}/a.txt", "--model_type=char", "--vocab_size=30"]
    args += [f.format(empty=tmp_path / "empty.txt") for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--output={tmp_path}/out/tok.model"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and named in message and "\n" not in message, message
    assert not os.path.exists(tmp_path / "out" / "tok.model")


def test_the_command_prints_no_traceback(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.tokenizer",
            "--input=/no/such/*.txt",
            f"--output={tmp_path}/t",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: --input" in result.stderr
