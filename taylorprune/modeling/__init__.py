"""Load: checkpoints in, where their decoder blocks and prunable linears are, and how to replay one block."""
