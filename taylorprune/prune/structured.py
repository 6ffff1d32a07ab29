"""Structured pruning: structures of a LLaMA-class decoder that are removed for real (``--structure``).

A *group* is everything that goes when one structure goes, as (linear, dimension, indices) members:

- ``neurons``: MLP channel j = row j of gate_proj and up_proj and column j of down_proj (its consumer);
- ``heads``, ``--head-mode query-heads``: query head h = its head_dim rows of q_proj and columns of o_proj; the
  same number is removed from every KV group, so num_attention_heads stays a multiple of num_key_value_heads;
- ``heads``, ``--head-mode kv-groups``: KV group g = key and value head g (rows of k_proj, v_proj) with its query
  heads (rows of q_proj, columns of o_proj); the q-per-kv ratio is unchanged;
- ``blocks``: whole decoder blocks (``prune.depth``).

Widths stay uniform: every decoder block loses the same count of each structure (``ratio`` × its count,
rounded), so the output has one intermediate_size and one head count and is a standard architecture; head_dim
never changes (rotary embeddings are untouched). Removal slices the tensors (``remove``), ``compensate`` refits
the consumer of removed channels (down_proj, o_proj) by least squares on calibration activations, and
``update_config`` writes the new widths into the model's config.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune.errors import UserError
from taylorprune.options import Options, option

KINDS = ("neurons", "heads", "blocks")
WIDTH_KINDS = ("heads", "neurons")  # order inside a block: attention first, then the MLP it feeds
HEAD_MODES = ("kv-groups", "query-heads")
BLOCK_SCORES = ("influence", "loss")
REDUCTIONS = ("sum", "abs-sum", "l2")


# ---------------------------------------------------------------------------------------------- options


def _compensate():
    return option(True, "Refit the consumer of removed channels (down_proj for neurons, o_proj for heads) by least "
                  "squares on the calibration activations of its kept inputs (off: plain removal, for ablations).")


def _percdamp():
    return option(0.01, "Compensation: dampening of H_KK as a fraction of its mean diagonal.", minimum=0)


@dataclass(frozen=True)
class NeuronOptions(Options):
    compensate: bool = _compensate()
    compensate_damp: float = _percdamp()


@dataclass(frozen=True)
class HeadOptions(Options):
    head_mode: str = option("kv-groups", "kv-groups (remove whole KV groups: a key/value head with its query heads) "
                            "or query-heads (the same number of query heads from every KV group).",
                            choices=HEAD_MODES)
    compensate: bool = _compensate()
    compensate_damp: float = _percdamp()


@dataclass(frozen=True)
class BlockOptions(Options):
    block_score: str = option("influence", "How decoder blocks are ranked: influence (1 − cosine of a block's input "
                              "and output, ShortGPT) or loss (exact calibration-loss increase when the block is "
                              "skipped, one forward per block).", choices=BLOCK_SCORES)


@dataclass(frozen=True)
class Structure:
    """One kind of structure: its options and the statistics its stage needs (the consumer's XXᵀ to compensate)."""

    name: str
    summary: str
    options: type[Options]

    def needs(self, options: Options) -> frozenset[str]:
        return frozenset({"hessian"}) if getattr(options, "compensate", False) else frozenset()


STRUCTURES: dict[str, Structure] = {
    "neurons": Structure("neurons", "MLP channels: rows of gate/up, columns of down_proj", NeuronOptions),
    "heads": Structure("heads", "attention heads (whole KV groups or query heads per group)", HeadOptions),
    "blocks": Structure("blocks", "whole decoder blocks (depth)", BlockOptions),
}


def parse_structures(text: str) -> tuple[str, ...]:
    """``--structure neurons,heads`` as names in processing order (blocks first, then heads, then neurons)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in STRUCTURES]
    if not names or bad:
        raise UserError(f"--structure {text}: choose from {', '.join(KINDS)} (comma-separated to combine)")
    if len(set(names)) != len(names):
        raise UserError(f"--structure {text}: a structure is named twice")
    return tuple(n for n in ("blocks", *WIDTH_KINDS) if n in names)


def count_of(ratio: float, total: int) -> int:
    """Structures removed out of ``total`` for a ratio: rounded half up."""
    return int(math.floor(ratio * total + 0.5))


# ---------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Shape:
    """The widths of a LLaMA-class config that structured pruning changes."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config) -> Shape:
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, heads, kv, head_dim, text.intermediate_size)


def removal_counts(kinds: tuple[str, ...], ratio: float, shape: Shape, head_mode: str) -> dict[str, int]:
    """Per kind, how many structures go in every block (blocks: in the model); bad requests are one-line errors.

    Heads count query heads: in kv-groups mode ``ratio`` × KV groups go (each with its query heads), in
    query-heads mode ``ratio`` × query heads, which must split evenly over the KV groups.
    """
    counts = {}
    for kind in kinds:
        if kind == "blocks":
            counts[kind] = _checked(count_of(ratio, shape.layers), shape.layers, ratio, "decoder blocks",
                                    "drops every block")
        elif kind == "neurons":
            counts[kind] = _checked(count_of(ratio, shape.intermediate), shape.intermediate, ratio, "MLP neurons",
                                    "leaves no neuron")
        elif head_mode == "kv-groups":
            groups = _checked(count_of(ratio, shape.kv_heads), shape.kv_heads, ratio, "KV groups", "leaves no head")
            counts[kind] = groups * (shape.heads // shape.kv_heads)
        else:
            heads = _checked(count_of(ratio, shape.heads), shape.heads, ratio, "query heads", "leaves no head")
            if heads % shape.kv_heads:
                per = shape.heads // shape.kv_heads
                fine = ", ".join(f"{k / per:.2f} ({k * shape.kv_heads} heads)" for k in range(1, per))
                raise UserError(f"--sparsity {ratio:g} removes {heads} of {shape.heads} query heads per block, not a "
                                f"multiple of the {shape.kv_heads} KV groups (GQA keeps the same number of query heads "
                                f"in every group); use one of: {fine or 'none (one query head per group)'}")
            counts[kind] = heads
    return counts


def widths_after(counts: Mapping[str, int], shape: Shape, head_mode: str) -> dict[str, int]:
    """The config widths once ``counts`` are removed."""
    heads = counts.get("heads", 0)
    kv_gone = heads // (shape.heads // shape.kv_heads) if head_mode == "kv-groups" else 0
    return {"num_hidden_layers": shape.layers - counts.get("blocks", 0), "num_attention_heads": shape.heads - heads,
            "num_key_value_heads": shape.kv_heads - kv_gone, "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate - counts.get("neurons", 0)}


def set_widths(config, widths: Mapping[str, int]) -> None:
    """Write ``widths`` into ``config`` (its text config), per-layer lists cut to the new depth."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    for key, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == layers and not key.startswith("_"):
            setattr(text, key, value[: widths["num_hidden_layers"]])
    for key, value in widths.items():
        setattr(text, key, value)


def check_config(config, counts: Mapping[str, int], shape: Shape, head_mode: str, flag: str) -> None:
    """Refuse, before any work, widths the model's own config class would refuse when the output is saved or loaded
    (LlamaConfig wants num_attention_heads to divide hidden_size, even with an explicit head_dim)."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    probe = copy.deepcopy(config)
    widths = widths_after(counts, shape, head_mode)
    set_widths(probe, widths)
    try:
        probe.validate()
    except Exception as exc:  # transformers raises its own validation error types
        cause = getattr(exc, "__cause__", None) or exc
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{flag} leaves {widths['num_attention_heads']} attention heads / "
                        f"{widths['num_key_value_heads']} KV heads, a config {type(config).__name__} refuses "
                        f"({reason}); choose another ratio or --head-mode") from None


def _checked(count: int, total: int, ratio: float, what: str, all_gone: str) -> int:
    if count >= total:
        raise UserError(f"--sparsity {ratio:g} removes {count} of {total} {what}: that {all_gone}; lower it")
    if count < 1:
        raise UserError(f"--sparsity {ratio:g} removes none of the {total} {what} (rounded); raise it to at least "
                        f"{0.5 / total:.3g}")
    return count


# ---------------------------------------------------------------------------------------------- groups


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


def groups_to_remove(groups: Groups, count: int) -> int:
    """``count`` is in query heads for heads (the unit of the report); in groups otherwise."""
    if groups.kind == "heads" and groups.chunk is None:
        per = groups.members[0].index.shape[1] // groups.members[1].index.shape[1]  # query heads per KV group
        return count // per
    return count


# ---------------------------------------------------------------------------------------------- scores


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


def removal_cost(groups: Groups, hessian: torch.Tensor) -> torch.Tensor:
    """Exact increase of the consumer's reconstruction error ‖ΔW·X‖² (H = 2XXᵀ/N) when one group's inputs
    vanish and nothing else changes: δθ_G·H·δθ_G = tr(W_G H_GG W_Gᵀ), δθ_G = −W[:, G]."""
    c = groups.consumer
    w = c.module.weight.detach().to(torch.float64)
    h = hessian.to(w.device, torch.float64)
    out = torch.empty(groups.size, dtype=torch.float64)
    for g, cols in enumerate(c.index):
        cols = cols.to(w.device)
        wg = w[:, cols]
        out[g] = ((wg @ h[cols][:, cols]) * wg).sum().cpu()
    return out


def obs_cost(groups: Groups, hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The consumer's reconstruction error left after removing one group's inputs *and* refitting the other
    columns optimally (structured OBS, Kurtic et al. ZipLM 2023, Ling et al. SlimGPT 2024):
    tr(W_G·((H⁻¹)_GG)⁻¹·W_Gᵀ), H = 2XXᵀ/N damped by ``percdamp`` × its mean diagonal."""
    c = groups.consumer
    w = c.module.weight.detach().to(torch.float64)
    h = hessian.to(w.device, torch.float64)
    h = h + percdamp * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                              device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    out = torch.empty(groups.size, dtype=torch.float64)
    for g, cols in enumerate(c.index):
        cols = cols.to(w.device)
        wg = w[:, cols]
        out[g] = (torch.linalg.solve(hinv[cols][:, cols], wg.T) * wg.T).sum().cpu()
    return out


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


# ---------------------------------------------------------------------------------------------- surgery


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
