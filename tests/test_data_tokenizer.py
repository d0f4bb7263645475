"""Tokenizer: the bundled model, in-graph tokenization, and the training command."""

import logging
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


def _small_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("some text to learn from\n" * 50)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "plain_file").write_text("x")
    (tmp_path / "dir.model").mkdir()


def _all_files(root):
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("name", ["tok", "tok.model"])
def test_output_path_with_or_without_model_suffix(tmp_path, capsys, name):
    _small_corpus(tmp_path)
    main(
        [
            f"--input={tmp_path}/a.txt",
            "--model_type=char",
            "--vocab_size=30",
            f"--output={tmp_path}/new/{name}",  # its directory is created
        ]
    )
    assert Tokenizer(str(tmp_path / "new" / "tok.model")).vocab_size <= 30
    assert os.listdir(tmp_path / "new") == ["tok.model"]
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path}/new/tok.model: ")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--vocab_size=0"], "--vocab_size=0: "),
        (["--vocab_size=-5"], "--vocab_size=-5: "),
        (["--vocab_size=5"], "--vocab_size=5: "),  # < 4 special ids and the newline
        (["--vocab_size=100", "--model_type=bpe"], "--vocab_size=100: "),  # < 256 byte pieces
        (["--vocab_size=100000", "--model_type=bpe"], "--vocab_size=100000: "),  # > the text has
        (["--vocab_size=3000000000"], "--vocab_size=3000000000: "),  # not an int32
        (["--vocab_size=abc"], "--vocab_size: invalid int value"),
        (["--max_sentences=0"], "--max_sentences=0: "),
        (["--max_sentences=-1"], "--max_sentences=-1: "),
        (["--max_sentences=3000000000"], "--max_sentences=3000000000: "),
        (["--model_type=word"], "--model_type: invalid choice"),
        (["--file_format=csv"], "--file_format: invalid choice"),
        (["--input=/no/such/dir/*.txt"], "--input: no files match '/no/such/dir/*.txt'"),
        (["--input={tmp}/a.txt,{tmp}/nope*.txt"], "--input: no files match"),  # every glob
        (["--input= , "], "--input: empty"),
        (["--input={tmp}/empty.txt"], "--input: no text"),
        (["--input=tfds:no_such_dataset"], "--input=tfds:no_such_dataset: "),
        (
            ["--input=tfds:mnist", "--tfds_data_dir={tmp}/tfds"],
            "set --tfds_data_dir",
        ),  # no download
        (["--input=tfds:"], "--input=tfds:: give a dataset name"),
        (["--vocab_size=0", "--input=tfds:mnist"], "--vocab_size=0: "),  # flags before input
        (["--output={tmp}/plain_file/tok", "--input=tfds:mnist"], "--output="),
        (["--output={tmp}/"], "--output="),  # no file name
        (["--output={tmp}/dir"], "--output="),  # dir.model is a directory
        (["--output={tmp}/plain_file/tok"], "is a file, not a directory"),
    ],
)
def test_bad_command_line_values_are_one_line_and_write_nothing(
    tmp_path, capsys, caplog, flags, named
):
    _small_corpus(tmp_path)
    before = _all_files(tmp_path)
    args = [f"--input={tmp_path}/a.txt", "--model_type=char", "--vocab_size=30"]
    args += [f"--output={tmp_path}/out/tok.model"]  # its directory does not exist yet
    with pytest.raises(SystemExit) as exit_info:
        main(args + [f.format(tmp=tmp_path) for f in flags])  # the last of a flag wins
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and named in message and "\n" not in message, message
    assert capsys.readouterr().out == ""
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert _all_files(tmp_path) == before  # nothing written, not even the output's directory


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS dataset, prepared locally."""
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_text",
        version="1.0.0",
        features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
        split_datasets={"train": [(i, {"body": f"document {i}"}) for i in range(8)]},
        data_dir=data_dir,
    )
    return data_dir


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--tfds_text_key=text"], "--tfds_text_key='text': not a feature"),
        (["--tfds_split=test"], "--tfds_split='test': "),
        (["--tfds_split=train[abc]"], "--tfds_split='train[abc]': "),
        ([], None),  # a prepared dataset trains
    ],
)
def test_tfds_input_is_checked_before_reading(tfds_dir, tmp_path, flags, named):
    args = ["--input=tfds:tiny_text", f"--tfds_data_dir={tfds_dir}", "--tfds_text_key=body"]
    args += ["--model_type=char", "--vocab_size=40", f"--output={tmp_path}/tok", *flags]
    if named is None:
        main(args)
        assert 3 not in Tokenizer(f"{tmp_path}/tok.model").encode("document 7")
        return
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {named}") and "\n" not in message, message
    assert os.listdir(tmp_path) == []


def test_the_command_prints_one_error_line_and_no_traceback(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.tokenizer",
            "--input=/no/such/*.txt",
            f"--output={tmp_path}/out/t",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --input: no files match"), lines
    assert result.stdout == "" and os.listdir(tmp_path) == []
