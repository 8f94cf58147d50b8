"""Evaluation: likelihood estimates (ELBO, exact NLL), corpus and instruction evaluations, quality metrics."""
