"""Benchmarks of sevi-serve: the CHAIR hallucination metric and its COCO vocabulary."""
