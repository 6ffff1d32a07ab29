"""Statistics: what calibration data tells about each target linear (activation norms, Hessians XXᵀ,
gradients, Hessian-vector products), how each is computed (its scope) and how it is cached.

``stats.registry`` is the one registry; methods name the statistics they need and never how they are made.
"""
