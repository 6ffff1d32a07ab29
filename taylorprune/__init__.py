"""taylorprune: prune LLaMA-class causal LMs layer by layer (magnitude, Wanda, GBLM, SparseGPT, Taylor)."""

__version__ = "0.1.0"
