"""Evaluation of frozen features: extraction, kNN and linear probes."""
