"""Decoding: generation parameters, logits processing, stop strings, the batched engine,
beam search and `Generation` (rnngen.decoding.generation)."""
