"""The reference engine: batched, KV-cached decoding in PyTorch/transformers with SEVI in its attention
(generation.py), the engine the server runs it as (transformers_engine.py) and its CLI (generate.py)."""
