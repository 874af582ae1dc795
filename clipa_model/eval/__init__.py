"""Evaluation: zero-shot classification, retrieval, benchmarks and their history."""
