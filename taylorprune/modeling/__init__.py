"""Load: checkpoints in, and where their decoder blocks and prunable linears are."""
