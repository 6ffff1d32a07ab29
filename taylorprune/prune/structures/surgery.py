"""Surgery on a block: refit the consumer of removed channels, slice the tensors, write the new widths.

``compensate`` refits the consumer (down_proj, o_proj) by least squares on calibration activations before
``remove`` slices the dropped groups out of every member; ``update_config`` writes the new uniform widths into
the config so ``from_pretrained`` builds exactly these tensors. ``zero`` is the same removal with shapes kept
(the state of multi-step selections, and the tests' reference).
"""

from __future__ import annotations

import torch
from torch import nn

from taylorprune.prune.structures.groups import Groups, attention_of


def _kept(groups: Groups, drop: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(groups.size, dtype=torch.bool)
    keep[drop] = False
    return keep


@torch.no_grad()
def compensate(groups: Groups, drop: torch.Tensor, hessian: torch.Tensor, percdamp: float) -> None:
    """Least-squares refit of the consumer's kept columns: W_K ← W_K + W_R·H_RK·H_KK⁻¹ minimises
    ‖W_K'·X_K − W·X‖² over the calibration inputs X (H ∝ XXᵀ, damped by ``percdamp`` × mean diagonal), the
    structured OBS update of SlimGPT (Ling et al., 2024) and of Kurtic et al.'s ZipLM, applied once to the whole
    removed set. Called before ``remove``."""
    c = groups.consumer
    keep = _kept(groups, drop)
    kept, gone = c.index[keep].flatten(), c.index[drop].flatten()
    w = c.module.weight
    h = hessian.to(w.device, torch.float64)
    hkk = h[kept][:, kept]
    damp = percdamp * torch.diagonal(hkk).mean().clamp_min(1e-12)
    hkk = hkk + damp * torch.eye(len(kept), dtype=torch.float64, device=w.device)
    w64 = w.detach().to(torch.float64)
    # correction Cᵀ = H_KK⁻¹ H_KR W_Rᵀ (H symmetric)
    correction = torch.linalg.solve(hkk, h[kept][:, gone] @ w64[:, gone].T).T
    new = w64[:, kept] + correction
    if torch.isfinite(new).all():
        w[:, kept] = new.to(w.dtype)


def take_out(groups: Groups, drop: torch.Tensor, stats, options, block: nn.Module) -> None:
    """Remove the dropped groups from ``block``, refitting their consumer first when ``options.compensate`` (with
    the consumer's XXᵀ from ``stats``, the statistic the structure declares it needs)."""
    if getattr(options, "compensate", False):
        compensate(groups, drop, stats[groups.consumer.path]["hessian"], options.compensate_damp)
    remove(groups, drop, block)


def _shrink(linear: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    keep = keep.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, keep).contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if dim == 0:
        linear.out_features = weight.shape[0]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, keep).contiguous(), requires_grad=False)
    else:
        linear.in_features = weight.shape[1]


@torch.no_grad()
def zero(groups: Groups, drop: torch.Tensor) -> None:
    """Zero the dropped groups' weights (and biases) in place, shapes unchanged (the reference of the tests and
    the state of multi-step selections)."""
    for m in groups.members:
        cols = m.index[drop].flatten().to(m.module.weight.device)
        m.module.weight.index_fill_(m.dim, cols, 0.0)
        if m.dim == 0 and m.module.bias is not None:
            m.module.bias.index_fill_(0, cols, 0.0)


@torch.no_grad()
def remove(groups: Groups, drop: torch.Tensor, block: nn.Module) -> None:
    """Slice the dropped groups out of every member; attention modules learn their new head counts."""
    keep = _kept(groups, drop)
    for m in groups.members:
        _shrink(m.module, m.dim, torch.sort(m.index[keep].flatten()).values)
    if groups.kind == "heads":
        attn = attention_of(block)
        q, k = attn.q_proj, attn.k_proj
        hd = int(attn.head_dim)
        heads, kv = q.out_features // hd, k.out_features // hd
        attn.num_key_value_groups = heads // kv
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)
    elif isinstance(getattr(getattr(block, "mlp", None), "intermediate_size", None), int):
        block.mlp.intermediate_size = groups.members[0].module.out_features


def block_widths(block: nn.Module) -> dict[str, int]:
    """(heads, kv heads, intermediate) as the block's tensors say."""
    attn = attention_of(block)
    hd = int(attn.head_dim)
    return {"num_attention_heads": attn.q_proj.out_features // hd,
            "num_key_value_heads": attn.k_proj.out_features // hd,
            "intermediate_size": block.mlp.gate_proj.out_features, "head_dim": hd}


def update_config(config, blocks: nn.ModuleList) -> dict[str, int]:
    """Write the blocks' widths into ``config`` (which must be uniform) and return them; head_dim is written
    explicitly, since its default hidden_size // num_attention_heads would change with the head count."""
    widths = [block_widths(b) for b in blocks]
    if any(w != widths[0] for w in widths):
        raise RuntimeError(f"non-uniform widths after structured pruning: {widths}")
    out = {**widths[0], "num_hidden_layers": len(blocks)}
    text = getattr(config, "text_config", None) or config
    for key, value in out.items():
        setattr(text, key, value)
    return out


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
