"""Speculative decoding inside `vlm.generate(..., assistant_model=draft)`: routing, chain and tree decoding,
per-call settings and statistics."""
