"""Execution: the V4 math as functions (`ops`), the model over whole sequences and over paged caches,
speculative drafters, and `dispatch`, the one call site of every hot op (Triton or torch)."""
