"""Which text an evaluation reads: the run's validation data, other text files, or a TFDS split.

Each is the run's data config with the source replaced, read by the data pipeline's
evaluation stream (data/pipeline.py): the same windows, packing and loss weights as
training's evaluation. Other sources use data.pipeline=stream, which tokenizes only
the evaluation split and writes no token cache.
"""

from data.config import encoder_length
from data.pipeline import make_eval_batches
from data.sources import expand_globs
from errors import UserError


def text_data_config(
    data_config, *, text_files: str = "", tfds: str = "", tfds_text_key="", tfds_data_dir=""
):
    """`data_config` (a ConfigDict) reading `text_files` (globs) or `tfds` ('NAME:SPLIT');
    the TFDS text key and data directory default to the config's."""
    data = data_config.copy_and_resolve_references()
    if text_files:
        expand_globs(text_files, "--text_files")  # no match: an error naming the flag
        data.update(source="files", train_files=text_files, eval_files=text_files, mixture="")
        data.pipeline = "stream"
    elif tfds:
        name, _, split = tfds.partition(":")
        if not name or not split:
            raise UserError(f"--tfds={tfds!r}: give NAME:SPLIT, e.g. lm1b:test.")
        data.update(source="tfds", tfds_name=name, tfds_train_split=split, tfds_eval_split=split)
        data.update(
            pipeline="stream",
            mixture="",
            tfds_text_key=tfds_text_key or data.tfds_text_key,
            tfds_data_dir=tfds_data_dir or data.tfds_data_dir,
        )
    return data


def eval_batches(
    data_config, batch_size: int, model_config, max_batches: int | None = None, train=None
):
    """The finite evaluation batches of `data_config` for the model of `model_config` (its
    vocabulary; an encoder-decoder's gain the encoder fields) under the objective of `train`
    (a run's config.train; None = clm); `max_batches` (0 = all) replaces
    data.eval_max_batches when given."""
    data = data_config.copy_and_resolve_references()
    if max_batches is not None:
        data.eval_max_batches = max_batches
    return make_eval_batches(
        data,
        global_batch_size=batch_size,
        model_vocab_size=model_config.vocab_size,
        train_config=train,
        encoder_seq_len=encoder_length(data, model_config.encoder_layers),
    )
