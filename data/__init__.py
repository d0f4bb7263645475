"""Input pipeline: sources, tokenizer, the token cache, and batches from it (or streamed)."""
