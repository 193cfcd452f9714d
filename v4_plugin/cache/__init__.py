"""Cache memory: bytes per entry and per token of every V4 cache, the cache formats a server may
choose, and the byte records of FP8 KV entries and FP8 / FP4 indexer keys."""
