"""Score: statistics collected on calibration data and the importance scores built from them.

Importing this package registers every built-in method.
"""

from taylorprune.scoring import gblm, magnitude, oba, sparsegpt, wanda  # noqa: F401  (registration side effects)
from taylorprune.scoring.registry import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
