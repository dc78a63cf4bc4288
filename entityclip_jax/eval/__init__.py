"""Evaluation with the plain CLIP towers: Recall@K, zero-shot classification, search, attention view, reports."""
