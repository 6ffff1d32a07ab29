"""Save: an atomically written Hugging Face folder plus the JSON report."""
