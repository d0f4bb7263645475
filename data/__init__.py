"""Input pipeline: sentencepiece tokenizer and tf.data streams of packed batches."""
