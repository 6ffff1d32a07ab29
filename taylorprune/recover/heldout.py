"""Held-out KL per calibration source, for recoveries whose windows come from a mix (``--calib-mix``).

Why: a mix's single held-out number can hide that recovery fitted one source and lost the other (the model's own
text against WikiText, say). Each source's held-out windows (``recover.windows.mixed_windows``) are scored apart,
before and after training, with the loss recovery reports: the KL(teacher ‖ student) of the next-token
distributions at the recovery temperature. One window at a time, so no batch of full-vocabulary logits is held;
every rank scores every held-out window (a handful), so the numbers need no reduction.
"""

from __future__ import annotations

import torch
from torch import nn

from taylorprune.recover.distill import kl_loss
from taylorprune.recover.teacher import Teacher, model_outputs


@torch.no_grad()
def per_source(model: nn.Module, teacher: Teacher, held: torch.Tensor, sources: list[dict], temperature: float,
               device: torch.device) -> dict[str, float]:
    """{source: mean held-out KL over its windows}; ``sources`` in the order of ``held``, each with ``heldout``
    windows."""
    was_training = model.training
    model.eval()
    out, start = {}, 0
    try:
        for source in sources:
            total = 0.0
            for k in range(start, start + source["heldout"]):
                ids = held[k:k + 1].to(device)
                target, _ = teacher.outputs(ids)
                logits, _ = model_outputs(model, ids, False)
                total += float(kl_loss(logits, target.to(logits.device), temperature))
            out[source["source"]] = round(total / source["heldout"], 6)
            start += source["heldout"]
    finally:
        model.train(was_training)
    return out
