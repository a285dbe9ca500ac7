"""Evaluation: feature networks, metrics, the benchmark runner and its report (never imports distill)."""
