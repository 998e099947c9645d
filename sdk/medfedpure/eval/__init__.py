"""Robustness evaluation: attacks on the classifier and on the whole defended pipeline."""
