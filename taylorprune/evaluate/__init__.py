"""Evaluate: perplexity with the protocol of the pruning papers."""
