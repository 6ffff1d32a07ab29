"""Optimal Brain Apoptosis (OBA): pruning with exact Hessian-vector products of the removal.

Sun, Fang, Wang, Jiang, Kong, Hu, Fang, Xu, "Optimal Brain Apoptosis", ICLR 2025, arXiv:2502.17941. OBA
estimates the loss change of removing parameters to second order with exact Hessian-vector products (never
the Hessian itself), cross-layer curvature included. ``--oba-mode`` picks one of three variants:

- ``swap`` (default; our adaptation for LLMs, not in the paper): OBA's exact second-order change of the
  removal, applied where the quadratic model is exact, each linear's reconstruction error ‖(W⊙S)·X‖² with
  H = XXᵀ. The initial mask is Wanda's (|W|·‖X‖₂, per row); then the swap search of ``prune.refine`` (up to
  ``--swap-rounds`` rounds of exact-HVP-driven swaps of a kept and a pruned weight per row, accepted only when
  the row's exact error drops) refines it. Exact per-row sparsity and N:M; ``--update obs`` reconstructs the
  kept weights afterwards. It differs from the paper in the objective (layer-wise reconstruction instead of
  the model's loss) and in being a search over masks instead of a one-shot ranking.
- ``released`` (the authors' released code, NEU-REAL/OBA ``oba_importance.py`` / ``oba_pruner.py`` /
  ``conduct_pruning.py``): importance I = θ ⊙ (R·θ) with R = H − Jᵀ(∇²_z ℓ)J the residual (non Gauss–Newton)
  part of the Hessian of the calibration loss (z: logits), summed signed over windows and over all steps so
  far, |Σ I| / count; per linear divided by its maximum (+1e-6), plus |W|; one global threshold over all
  targets; ``--oba-steps`` (49) steps to density (1−s)^{k/steps}, importance recomputed on the masked model
  before every step from ``--oba-step-windows`` calibration windows (0: all). Differences from their code: R is
  exact (their surrogate keeps only the bilinear cross-layer terms and drops the curvature of SiLU/softmax/
  RMSNorm; on a bias-free ReLU MLP the two are equal, see tests/test_oba.py), weights pruned at an earlier step
  stay pruned instead of keeping a stale score that can take budget, embeddings and lm_head are never pruned,
  and for N:M patterns one step picks N of every M by the same score.
- ``full`` (the project's earlier variant): one-shot |g·δθ + ½·δθ·(H·δθ)| with δθ = −W over all weights, the
  full Hessian of the dense model's loss (``--hvp-scope model``) or of each block's reconstruction
  (``block``), ranked per row; ``--oba-first-order`` adds g·δθ, ``--oba-normalize max`` the authors' per-layer
  normalisation plus |W|. It ranks weights by a signed cross-term dominated by weights that are kept, which is
  why it falls behind magnitude on LLMs (docs/BENCHMARKS.md).

Structured pruning (``--structure neurons|heads``): ``released`` is the authors' structured recipe and ``swap``
the exact removal cost on the layer reconstruction objective (``scoring.oba_structured``); ``full`` has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.errors import UserError
from taylorprune.options import Options, option
from taylorprune.scoring.oba_released import released_prune
from taylorprune.scoring.oba_structured import RECON, RELEASED
from taylorprune.scoring.spec import Method
from taylorprune.scoring.wanda import activation_term
from taylorprune.stats.hvp_block import dtype_option

MODES = ("swap", "released", "full")
HVP_SCOPES = ("model", "block")
NORMALIZE = ("none", "max")


@dataclass(frozen=True)
class ObaOptions(Options):
    oba_mode: str = option("swap", "swap (exact-HVP swap search on each linear's reconstruction error, Wanda "
                           "start; for LLMs), released (the authors' code: residual Hessian, global ranking, "
                           "multi-step) or full (one-shot full-Hessian score).", choices=MODES)
    hvp_scope: str = option("model", "full mode: Hessian of the whole model's calibration loss (model), or of each "
                            "block's output reconstruction inside the engine (block; for large models).",
                            choices=HVP_SCOPES, memory_hint="--hvp-scope block")
    oba_first_order: bool = option(False, "full mode: add the first-order term g·δθ (off, as OBA).")
    oba_normalize: str = option("none", "full mode: none (the score as written) or max (per-layer |ΔL|/max + |W|, "
                                "the authors' unstructured recipe).", choices=NORMALIZE)
    oba_steps: int = option(49, "released mode: pruning steps to the target (the authors' 49), importance "
                            "recomputed on the masked model before each.", minimum=1, maximum=10_000)
    oba_step_windows: int = option(0, "released mode: calibration windows per step, taken in turn (0: all of "
                                   "them every step).", minimum=0)
    hvp_dtype: str = dtype_option()

    def check_given(self, given: frozenset[str]) -> None:
        for name in sorted(given):
            modes = MODE_OPTIONS.get(name)
            if modes and self.oba_mode not in modes:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} applies to --oba-mode {' or '.join(modes)}, not {self.oba_mode}; drop it or "
                                f"choose --oba-mode {modes[0]}")


# the options that only some modes read
MODE_OPTIONS = {"hvp_scope": ("full",), "oba_first_order": ("full",), "oba_normalize": ("full",),
                "oba_steps": ("released",), "oba_step_windows": ("released",), "hvp_dtype": ("released", "full")}


def _needs(options: ObaOptions) -> frozenset[str]:
    if options.oba_mode == "swap":
        return frozenset({"act_norm_sq"})
    if options.oba_mode == "released":
        return frozenset()  # computes its residual HVPs itself, step by step, on the masked model
    return frozenset({"loss_grad", "hvp"}) if options.hvp_scope == "model" else frozenset({"block_hvp"})


def score(weight: torch.Tensor, stats, options: ObaOptions) -> torch.Tensor:
    """swap: Wanda's score (the swap search starts from its mask); full: |second-order loss change|."""
    if options.oba_mode == "swap":
        return activation_term(weight, stats["act_norm_sq"])
    delta = -weight
    hv = stats["hvp"] if "hvp" in stats else stats["block_hvp"]
    change = 0.5 * delta * hv.to(weight.device)
    if options.oba_first_order and "loss_grad" in stats:
        change = change + stats["loss_grad"].to(weight.device) * delta
    if options.oba_normalize == "max":
        return change.abs() / change.abs().max().clamp_min(1e-30) + weight.abs()
    return change.abs()


METHOD = Method(
    "oba", "Optimal Brain Apoptosis: exact HVPs of the removal (swap | released | full)",
    "Sun et al., arXiv:2502.17941",
    statistics=("act_norm_sq", "loss_grad", "hvp", "block_hvp"), options=ObaOptions, score=score,
    select=_needs,
    stages=lambda o: {"refine": "swap"} if o.oba_mode == "swap" else {},
    prune_model=lambda o: released_prune if o.oba_mode == "released" else None,
    structured=lambda o: {"released": RELEASED, "swap": RECON}.get(o.oba_mode),
)
