"""Recovery after pruning: distillation from the dense model (``distill``), what trains (``student``)."""
