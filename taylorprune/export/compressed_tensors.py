"""Write and read compressed-tensors ``pack-quantized`` folders (what llm-compressor saves for W4A16/W8A16).

Such a folder is served by vLLM and loads with ``AutoModelForCausalLM.from_pretrained`` once the
``compressed-tensors`` package is installed (on a CPU too: the package unpacks in plain torch). Writing and
reading back need neither package: the layout is small and fixed, and ``inspect`` must show the grids without
the extra.

Layout per quantized Linear ``name`` (verified against compressed-tensors 0.20.1's own compressor):

- ``name.weight_packed`` int32 ``[out, ceil(in*b/32)]``: codes packed along the input dim, element ``i`` of every
  run of 32 at bit ``i*b`` of that run's ``b`` words (little-endian; 4-bit = 8 codes a word, 8-bit = 4).
- ``name.weight_scale`` ``[out, in/group]`` (``[out, 1]`` per channel), in the scale dtype.
- ``name.weight_shape`` int64 ``[out, in]``.
- ``name.weight_zero_point`` int32 ``[ceil(out*b/32), in/group]``, asymmetric only: zero points packed along dim 0.

compressed-tensors keeps signed codes ``c`` in ``[-2^(b-1), 2^(b-1)-1]`` and stores ``c + 2^(b-1)``, so the stored
bits are exactly the unsigned GPTQ-style codes this module takes (``w = s*(q - z)``, ``z = 2^(b-1)`` when symmetric).

Loading with transformers 5.25 (checked): symmetric folders, mixed precision included, load as they are with
compressed-tensors 0.17.1-0.20.1. Asymmetric ones need compressed-tensors <= 0.17.1, or, with 0.18-0.20.1 (whose
load-time compression leaves zero points unpacked), ``CompressedTensorsConfig(dequantize=True)`` and one scheme.
vLLM serves 4 and 8 bits; 3/5/6/7-bit codes straddle words (the dense packing of compressed-tensors >= 0.18).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "pack-quantized"
# the compressed-tensors release whose compressor this layout was checked against (written as "version")
CT_VERSION = "0.20.1"
# vLLM loads q/k/v and gate/up as one fused matrix: the shards must share a scheme, or all be ignored
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_CHUNK = 1 << 22  # elements per packing step: bounds the int64 temporaries on large layers


@dataclass
class LinearQuant:
    """One Linear's quantization result: unsigned codes and their grid.

    ``codes`` [out, in] integers in ``[0, 2^wbits - 1]``; ``scales`` [out, n_groups] float (their dtype is stored
    as is); ``zeros`` [out, n_groups] integers in the same range, or None when symmetric (zero at ``2^(wbits-1)``,
    GPTQ's convention); ``group_size`` -1 means one group per output row (compressed-tensors' "channel").
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    wbits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        # Checked here, once, because a bad grid written to disk only shows up as garbage logits in vLLM.
        if not 1 <= self.wbits <= 8:
            raise ValueError(f"pack-quantized holds 1..8-bit codes, not {self.wbits}")
        if self.codes.ndim != 2 or self.codes.is_floating_point():
            raise ValueError("codes must be a 2-D integer tensor [out, in]")
        out, cols = self.codes.shape
        if self.group_size != -1 and (self.group_size <= 0 or cols % self.group_size):
            raise ValueError(f"group_size {self.group_size} must be -1 or divide the input width {cols}")
        shape = (out, 1 if self.group_size == -1 else cols // self.group_size)
        if tuple(self.scales.shape) != shape or not self.scales.is_floating_point():
            raise ValueError(f"scales must be float {list(shape)}, got {self.scales.dtype} {list(self.scales.shape)}")
        top = (1 << self.wbits) - 1
        if self.codes.numel() and (int(self.codes.min()) < 0 or int(self.codes.max()) > top):
            raise ValueError(f"codes must lie in [0, {top}] (unsigned, zero point subtracted on dequantization)")
        if self.symmetric and self.zeros is not None:
            if bool((self.zeros != 1 << (self.wbits - 1)).any()):
                raise ValueError("symmetric grids have their zero at 2^(wbits-1); pass zeros=None")
            self.zeros = None
        zeros = self.zeros
        if not self.symmetric and (zeros is None or tuple(zeros.shape) != shape or zeros.is_floating_point()
                                   or int(zeros.min()) < 0 or int(zeros.max()) > top):
            raise ValueError(f"asymmetric grids need integer zeros {list(shape)} in [0, {top}]")

    @property
    def scheme(self) -> tuple[int, int, bool]:
        """What config groups are keyed on: linears with equal (bits, group, symmetric) share one group."""
        return self.wbits, self.group_size, self.symmetric

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s*(q - z)``, the product taken in ``dtype`` (default: the scales' dtype) as compressed-tensors does,
        so the result matches what ``from_pretrained`` builds in that dtype bit for bit."""
        dtype = dtype or self.scales.dtype
        zero = self.zeros if self.zeros is not None else torch.full(self.scales.shape, 1 << (self.wbits - 1))
        step = self.group_size if self.group_size != -1 else self.codes.shape[1]
        zero, scales = (t.repeat_interleave(step, dim=1) for t in (zero.to(self.codes.device, torch.int32),
                                                                    self.scales.to(dtype)))
        return (self.codes.to(torch.int32) - zero).to(dtype) * scales


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers [rows, n] along the last dim into int32 [rows, ceil(n*bits/32)]."""
    step = max(1, _CHUNK // max(values.shape[1], 1))
    words = torch.cat([_pack_rows(chunk.to(torch.int64), bits) for chunk in values.split(step)])
    words = words[:, : -(-values.shape[1] * bits // 32)]
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement: bit 31 is the sign bit on disk


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = v.shape
    runs = F.pad(v, (0, -n % 32)).reshape(rows, -1, 32)  # padding codes are 0, as compressed-tensors pads
    if 32 % bits == 0:  # no code straddles a word: word j of a run holds codes j*per .. j*per+per-1
        per = 32 // bits
        lanes = runs.reshape(rows, runs.shape[1], bits, per)
        words = (lanes << (torch.arange(per, device=v.device) * bits)).sum(-1)
    else:  # 3/5/6/7 bits: lay the run out as a bit stream (element-major, LSB first), cut into 32-bit words
        stream = (runs.unsqueeze(-1) >> torch.arange(bits, device=v.device)) & 1
        words = (stream.reshape(rows, runs.shape[1], bits, 32) << torch.arange(32, device=v.device)).sum(-1)
    return words.reshape(rows, -1)


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 [rows, ceil(n*bits/32)] to unsigned codes [rows, n] (uint8)."""
    if words.dtype != torch.int32 or words.shape[-1] != -(-n * bits // 32):
        raise ValueError(f"expected int32 [rows, {-(-n * bits // 32)}] for {n} {bits}-bit codes, got "
                         f"{words.dtype} {list(words.shape)}")
    step = max(1, _CHUNK // max(words.shape[1] * 32 // bits, 1))
    codes = torch.cat([_unpack_rows(chunk.to(torch.int64) & 0xFFFFFFFF, bits) for chunk in words.split(step)])
    return codes[:, :n].to(torch.uint8)


def _unpack_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    rows = w.shape[0]
    runs = F.pad(w, (0, -w.shape[1] % bits)).reshape(rows, -1, bits)
    if 32 % bits == 0:
        per = 32 // bits
        codes = (runs.unsqueeze(-1) >> (torch.arange(per, device=w.device) * bits)) & ((1 << bits) - 1)
    else:
        stream = (runs.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1
        codes = (stream.reshape(rows, runs.shape[1], 32, bits) << torch.arange(bits, device=w.device)).sum(-1)
    return codes.reshape(rows, -1)


def compress_linear(q: LinearQuant) -> dict[str, torch.Tensor]:
    """The tensors one Linear contributes (names relative to the module), as llm-compressor saves them."""
    out, cols = q.codes.shape
    tensors = {"weight_packed": pack_int32(q.codes, q.wbits), "weight_scale": q.scales.detach().contiguous(),
               "weight_shape": torch.tensor([out, cols], dtype=torch.int64)}
    if q.zeros is not None:  # only asymmetric grids store zero points; vLLM rejects them on symmetric schemes
        tensors["weight_zero_point"] = pack_int32(q.zeros.t(), q.wbits).t().contiguous()
    return tensors


def decompress_linear(tensors: Mapping[str, torch.Tensor], weights: Mapping) -> LinearQuant:
    """Our unpacker: one Linear's stored tensors plus its config group's ``weights`` args back to codes and grid."""
    if weights.get("type", "int") != "int" or weights.get("actorder") == "group" or "weight_g_idx" in tensors:
        raise ValueError(f"unsupported pack-quantized weights {dict(weights)} (int, no g_idx, are read)")
    bits, strategy, sym = int(weights["num_bits"]), weights.get("strategy") or "channel", weights.get("symmetric", True)
    out, cols = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"].reshape(1, 1).expand(out, 1) if strategy == "tensor" else tensors["weight_scale"]
    zeros = None if sym else unpack_int32(tensors["weight_zero_point"].t().contiguous(), bits, out).t()
    group = int(weights["group_size"]) if strategy == "group" else -1
    return LinearQuant(unpack_int32(tensors["weight_packed"], bits, cols), scales.contiguous(), zeros, bits, group,
                       bool(sym))


def vllm_fusion_conflicts(results: Mapping[str, LinearQuant], linear_names: list[str]) -> list[str]:
    """Fused shards (q/k/v, gate/up of one block) with different schemes: vLLM would load them as one matrix
    under the first shard's scheme (or raise for a partly ignored set), so such a folder cannot be served."""
    present, found = set(linear_names), []
    for name in linear_names:
        parent, _, leaf = name.rpartition(".")
        for shards in FUSED_SHARDS:
            if leaf == shards[0]:
                names = [f"{parent}.{s}" for s in shards if f"{parent}.{s}" in present]
                schemes = {results[n].scheme if n in results else None for n in names}
                if len(schemes) > 1:
                    found.append(f"{', '.join(names)} have different schemes {sorted(map(str, schemes))}")
    return found


def _weights_args(bits: int, group_size: int, symmetric: bool) -> dict:
    # the fields QuantizationArgs.model_dump() emits for int weight schemes (None-valued extras are omitted)
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size if group_size > 0
            else None, "strategy": "group" if group_size > 0 else "channel", "dynamic": False}


def build_quantization_config(results: Mapping[str, LinearQuant], linear_names: list[str]) -> dict:
    """config.json's ``quantization_config``: one config group per (bits, group, symmetric) scheme.

    A uniform model targets ``["Linear"]`` as llm-compressor writes it; mixed precision lists module names in each
    group. ``ignore`` names every Linear left in float (lm_head included), as compressed-tensors' own
    ``QuantizationConfig.from_pretrained`` does; embeddings are no Linear and need no entry.
    """
    by_scheme: dict[tuple[int, int, bool], list[str]] = {}
    for name in linear_names:
        if name in results:
            by_scheme.setdefault(results[name].scheme, []).append(name)
    uniform = len(by_scheme) == 1
    groups = {f"group_{i}": {"targets": ["Linear"] if uniform else names, "weights": _weights_args(*scheme),
                             "input_activations": None, "output_activations": None, "format": FORMAT}
              for i, (scheme, names) in enumerate(by_scheme.items())}
    return {"config_groups": groups, "format": FORMAT, "global_compression_ratio": None,
            "ignore": [n for n in linear_names if n not in results], "kv_cache_scheme": None,
            "moe_sparsity_config": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}


def write_folder(model: torch.nn.Module, tokenizer, results: Mapping[str, LinearQuant], folder: Path,
                 strict_vllm: bool = True) -> None:
    """Write ``model`` (float) with ``results``' linears packed as a from_pretrained-loadable folder.

    The float weights of quantized linears are never written; the rest of the state dict (embeddings, norms,
    unquantized linears) keeps its dtype. Tied tensors are written once, as ``save_pretrained`` does.
    ``strict_vllm`` refuses schemes that differ inside a fused q/k/v or gate/up set (see
    :func:`vllm_fusion_conflicts`); transformers would load those, vLLM would not.
    """
    from safetensors.torch import save_file

    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if unknown := sorted(set(results) - set(linear_names)):
        raise ValueError(f"not Linear modules of this model: {unknown[:3]}")
    if strict_vllm and (conflicts := vllm_fusion_conflicts(results, linear_names)):
        raise ValueError(f"vLLM fuses these shards and needs one scheme for them: {conflicts[0]}")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if (param == "weight" and module in results) or ident in seen:  # packed below / a tied copy, re-tied on load
            continue
        seen.add(ident)
        tensors[key] = value.detach().cpu().contiguous()
    for name, q in results.items():
        tensors.update({f"{name}.{k}": v.cpu() for k, v in compress_linear(q).items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    for key in ("sparsity_config", "quantization_config"):  # a source's own entries would contradict ours
        vars(config).pop(key, None)
    config.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"] = build_quantization_config(results, linear_names)
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _weights_for(name: str, groups: Mapping[str, Mapping]) -> Mapping:
    # compressed-tensors' precedence: an exact name, then a "re:" pattern, then a class name ("Linear": every
    # packed tensor belongs to a Linear-like module)
    targets = [(t, g["weights"]) for g in groups.values() for t in g.get("targets", [])]
    for test in (lambda t: t == name, lambda t: t.startswith("re:") and re.match(t[3:], name),
                 lambda t: not t.startswith("re:") and "." not in t):
        for target, weights in sorted(targets, key=lambda tw: tw[0]):
            if test(target):
                return weights
    raise ValueError(f"{name} is packed but no config group targets it")


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, LinearQuant]]:
    """Read a pack-quantized folder without compressed-tensors: (config.json, float tensors, quantized linears)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{folder} is not a compressed-tensors folder")
    groups = qcfg.get("config_groups") or {}
    # before 0.18 (compressed-tensors PR #715) 3/5/6/7-bit codes were packed 32//b a word with padding bits
    legacy = [int(p) for p in re.findall(r"\d+", str(qcfg.get("version") or "0.18"))[:2]] < [0, 18]
    for name, group in groups.items():
        if not isinstance(group, Mapping) or (group.get("format") or qcfg.get("format")) != FORMAT:
            raise ValueError(f"config group {name} is not a {FORMAT} scheme; only {FORMAT} is read")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    quant = {}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        parts = {s: tensors.pop(f"{name}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape",
                                                          "weight_zero_point", "weight_g_idx")
                 if f"{name}.{s}" in tensors}
        weights = _weights_for(name, groups)
        if legacy and 32 % int(weights["num_bits"]):
            raise ValueError(f"{name}: {weights['num_bits']}-bit codes of compressed-tensors < 0.18 are not read")
        quant[name] = decompress_linear(parts, weights)
    return config, tensors, quant


def read_dequantized(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's full state dict with every packed Linear dequantized to ``<name>.weight``."""
    _, tensors, quant = read_folder(folder)
    for name, q in quant.items():
        tensors[f"{name}.weight"] = q.dequantize(dtype)
    return tensors
