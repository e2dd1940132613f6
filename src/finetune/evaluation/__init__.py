"""Evaluation: base, champion and candidate on identical inputs; metrics, the one gate, reports."""
