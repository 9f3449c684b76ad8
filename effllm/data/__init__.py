"""Training text to token shards and back: text sources (files, JSONL, Parquet, hub datasets), the held-out
split, parallel resumable tokenization into memory-mapped shards (prepare), and the token batches that
training and evaluation read. Imports no model code."""
