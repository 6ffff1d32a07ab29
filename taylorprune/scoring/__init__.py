"""Score: one module per pruning method (its options, statistics, score and paper), and their registry."""
