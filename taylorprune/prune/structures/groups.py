"""Groups: the parts of a block's linears that go together when one structure goes.

``groups_of`` builds the groups of one kind in one block as (linear, dimension, indices) members; group scores
are reduced from per-weight values over each group (``reduce_groups``) and the lowest are chosen
(``choose``), the same count in every block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune.errors import UserError
from taylorprune.modeling.layout import Layout

REDUCTIONS = ("sum", "abs-sum", "l2")


@dataclass
class Member:
    """The part of one linear that belongs to the groups: ``index[g]`` are group g's rows (dim 0) or columns
    (dim 1) of ``module.weight``."""

    path: str
    module: nn.Linear
    dim: int
    index: torch.Tensor  # [groups, width] long

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per group, the entries of ``tensor`` (shaped like the weight) in this member: [groups, rest]."""
        index = self.index.to(tensor.device)
        picked = tensor.index_select(self.dim, index.flatten())
        if self.dim == 0:
            return picked.reshape(index.shape[0], -1)
        return picked.reshape(tensor.shape[0], index.shape[0], -1).transpose(0, 1).reshape(index.shape[0], -1)


@dataclass
class Groups:
    """The removable structures of one kind in one block; ``chunk``: groups come in runs of this many that must
    lose the same count (query heads of one KV group), None: any choice."""

    kind: str
    block: int
    members: list[Member]
    consumer: Member
    chunk: int | None = None

    @property
    def size(self) -> int:
        return self.consumer.index.shape[0]

    def params_per_group(self) -> int:
        total = 0
        for m in self.members:
            other = m.module.weight.shape[1 - m.dim]
            total += m.index.shape[1] * other
            if m.dim == 0 and m.module.bias is not None:
                total += m.index.shape[1]
        return total


def _child(block: nn.Module, names: tuple[str, ...], kind: str) -> nn.Module:
    for name in names:
        found = getattr(block, name, None)
        if found is not None:
            return found
    raise UserError(f"--structure {kind}: {type(block).__name__} has no {' or '.join(names)} module "
                    "(LLaMA-class blocks are supported)")


def _linear(parent: nn.Module, name: str, kind: str) -> nn.Linear:
    found = getattr(parent, name, None)
    if not isinstance(found, nn.Linear):
        raise UserError(f"--structure {kind}: {type(parent).__name__} has no nn.Linear {name} (LLaMA-class "
                        "gate/up/down and q/k/v/o projections are supported)")
    return found


def _paths(model_prefix: str, parent_name: str, names: tuple[str, ...]) -> list[str]:
    return [f"{model_prefix}.{parent_name}.{n}" for n in names]


def neuron_groups(block: nn.Module, prefix: str, index: int) -> Groups:
    """Groups of the MLP channels of ``block`` (``prefix``: its module path)."""
    mlp = _child(block, ("mlp",), "neurons")
    gate, up, down = (_linear(mlp, n, "neurons") for n in ("gate_proj", "up_proj", "down_proj"))
    width = gate.out_features
    idx = torch.arange(width).view(width, 1)
    paths = _paths(prefix, "mlp", ("gate_proj", "up_proj", "down_proj"))
    members = [Member(paths[0], gate, 0, idx), Member(paths[1], up, 0, idx), Member(paths[2], down, 1, idx)]
    return Groups("neurons", index, members, members[2])


def attention_of(block: nn.Module) -> nn.Module:
    return _child(block, ("self_attn", "attention"), "heads")


def head_groups(block: nn.Module, prefix: str, index: int, mode: str) -> Groups:
    """Groups of the attention heads of ``block``: whole KV groups or single query heads."""
    attn = attention_of(block)
    name = "self_attn" if getattr(block, "self_attn", None) is attn else "attention"
    q, k, v, o = (_linear(attn, n, "heads") for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hd = int(attn.head_dim)
    heads, kv = q.out_features // hd, k.out_features // hd
    rep = heads // kv
    paths = _paths(prefix, name, ("q_proj", "k_proj", "v_proj", "o_proj"))
    span = torch.arange(hd)
    if mode == "query-heads":
        qi = torch.arange(heads).view(heads, 1) * hd + span
        members = [Member(paths[0], q, 0, qi), Member(paths[3], o, 1, qi)]
        return Groups("heads", index, members, members[1], chunk=rep)
    qi = (torch.arange(kv).view(kv, 1) * rep * hd + torch.arange(rep * hd)).long()
    ki = torch.arange(kv).view(kv, 1) * hd + span
    members = [Member(paths[0], q, 0, qi), Member(paths[1], k, 0, ki), Member(paths[2], v, 0, ki),
               Member(paths[3], o, 1, qi)]
    return Groups("heads", index, members, members[3])


def groups_of(kind: str, block: nn.Module, prefix: str, index: int, head_mode: str = "kv-groups") -> Groups:
    if kind == "neurons":
        return neuron_groups(block, prefix, index)
    return head_groups(block, prefix, index, head_mode)


def all_groups(layout: Layout, kind: str, head_mode: str) -> list[Groups]:
    return [groups_of(kind, b, f"{layout.blocks_path}.{i}", i, head_mode) for i, b in enumerate(layout.blocks)]


def groups_to_remove(groups: Groups, count: int) -> int:
    """``count`` is in query heads for heads (the unit of the report); in groups otherwise."""
    if groups.kind == "heads" and groups.chunk is None:
        per = groups.members[0].index.shape[1] // groups.members[1].index.shape[1]  # query heads per KV group
        return count // per
    return count


def reduce_groups(groups: Groups, elements: Mapping[str, torch.Tensor], how: str) -> torch.Tensor:
    """Group scores [groups] (fp64) from per-weight values of each member linear (``elements`` by path).

    ``sum``: Σ over the group's weights; ``abs-sum``: |Σ| (signed values summed over the whole group first, as
    LLM-Pruner's vector-wise Taylor); ``l2``: sqrt(Σ value²) (the group norm).
    """
    if how not in REDUCTIONS:
        raise ValueError(how)
    total = torch.zeros(groups.size, dtype=torch.float64)
    for m in groups.members:
        part = m.take(elements[m.path].to(torch.float64))
        total += (part.pow(2) if how == "l2" else part).sum(dim=1).cpu()
    if how == "abs-sum":
        return total.abs()
    return total.sqrt() if how == "l2" else total


def choose(scores: torch.Tensor, count: int, chunk: int | None = None) -> torch.Tensor:
    """Sorted indices of the ``count`` lowest scores (stable: ties go to the lower index); with ``chunk``, the
    same number from every run of ``chunk`` consecutive groups."""
    scores = scores.to(torch.float64).cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("non-finite group scores")
    if chunk is None:
        return torch.sort(torch.sort(scores, stable=True).indices[:count]).values
    runs = scores.numel() // chunk
    per = count // runs
    picked = [torch.sort(scores[r * chunk:(r + 1) * chunk], stable=True).indices[:per] + r * chunk
              for r in range(runs)]
    return torch.sort(torch.cat(picked)).values
