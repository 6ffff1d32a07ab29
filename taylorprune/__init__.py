"""taylorprune: prune LLaMA-class causal LMs layer by layer (magnitude, Wanda, GBLM, SparseGPT, Taylor)."""

import time

__version__ = "0.1.0"
IMPORTED_AT = time.time()  # the report's start-up time counts from here (before torch and transformers load)
