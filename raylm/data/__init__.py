"""Data: corpus readers, tokenizer, prepare (text -> verified shards) and per-DP-rank streams (shards -> batches)."""
