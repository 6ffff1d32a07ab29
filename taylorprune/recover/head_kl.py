"""The distillation loss made a chunk of positions at a time from the student's final hidden states, so that no
batch-sized logits tensor (nor its softmaxes and their gradients) is ever held.

A batch of 4 × 512 positions over SmolLM2's 49k-token vocabulary has 400 MB of logits in fp32, and the plain loss
(``distill.kl_loss`` on whole logits, then autograd) walks that size about ten times: the student's and the
teacher's logits, both log-softmaxes, the KL and their backward, each freshly allocated. On a 128k-256k vocabulary
and 2k-token windows it is gigabytes. ``head_kl`` instead runs the head on ``CHUNK`` positions at a time, and, since
the loss ends there, computes the gradient with respect to the hidden states in the same pass: d(T²·KL)/d(logits)
= T·(softmax(s/T) − softmax(t/T)) / positions, sent back through the head by autograd (soft-capping included).
Backward then only scales that saved gradient. The head's own weights get no gradient, which recovery never trains
(``recover.student`` trains the decoder blocks or their adapters). The value and gradient equal the plain loss's
(tests/test_recover.py); on a 4 × 512 SmolLM2-shaped batch it took half the time (a CPU micro-benchmark).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 128  # positions per chunk: 128 × 49k fp32 logits = 25 MB
Head = Callable[[torch.Tensor], torch.Tensor]


def lm_head(model: nn.Module) -> Head:
    """A causal LM's final hidden states -> its logits: the output embedding, then any final soft-capping."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def apply(states: torch.Tensor) -> torch.Tensor:
        logits = head(states)
        return torch.tanh(logits / cap) * cap if cap else logits

    return apply


@dataclass
class Targets:
    """The teacher's logits for a batch: held whole, or made from its final hidden states through ``head`` a few
    positions at a time (then never whole)."""

    source: torch.Tensor  # (..., vocab) logits, or (..., hidden) final states when ``head`` is given
    head: Head | None = None

    def rows(self, rows: slice) -> torch.Tensor:
        flat = self.source.reshape(-1, self.source.shape[-1])[rows]
        return flat if self.head is None else self.head(flat)

    def logits(self) -> torch.Tensor:
        return self.source if self.head is None else self.head(self.source)


def head_matches(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``lm_head`` on the decoder's output gives the model's own logits (an architecture that scales its
    logits elsewhere does not, and then recovery takes the plain loss)."""
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits
        made = lm_head(model)(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
    return bool((whole - made).abs().max() <= 1e-3 * whole.abs().max().clamp_min(1e-6))


class _HeadKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states: torch.Tensor, head: Head, targets: Targets, temperature: float) -> torch.Tensor:
        flat = states.detach().reshape(-1, states.shape[-1])
        n, graded = flat.shape[0], ctx.needs_input_grad[0]  # a held-out evaluation needs the value only
        grad, total = torch.empty_like(flat) if graded else None, torch.zeros((), dtype=torch.float32,
                                                                               device=flat.device)
        for start in range(0, n, CHUNK):
            rows = slice(start, min(n, start + CHUNK))
            piece = flat[rows].detach().requires_grad_(graded)
            with torch.set_grad_enabled(graded):
                logits = head(piece).float()
            s = F.log_softmax(logits.detach() / temperature, dim=-1)
            t = F.log_softmax(targets.rows(rows).to(flat.device).float() / temperature, dim=-1)
            p = t.exp()
            total += (p * (t - s)).sum()
            if graded:
                q = s.exp_().sub_(p).mul_(temperature / n)
                (grad[rows],) = torch.autograd.grad(logits, piece, q)
        if graded:
            ctx.save_for_backward(grad.view(states.shape))
        return total * temperature**2 / n

    @staticmethod
    def backward(ctx, out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return out * grad, None, None, None


def head_kl(states: torch.Tensor, head: Head, targets: Targets, temperature: float) -> torch.Tensor:
    """Forward KL(teacher ‖ student) at ``temperature`` × T², mean over positions, of ``head(states)`` against
    ``targets`` (see the module docstring); differentiable with respect to ``states`` only."""
    return _HeadKL.apply(states, head, targets, temperature)
