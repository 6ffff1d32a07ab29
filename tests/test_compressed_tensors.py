"""compressed-tensors ``pack-quantized`` export: packing round trips, our own reader, and (when the package is
installed) loading through ``AutoModelForCausalLM.from_pretrained`` on the CPU with the same logits as the float
model holding the dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from taylorprune.export.compressed_tensors import (
    LinearQuant,
    compress_linear,
    decompress_linear,
    pack_int32,
    read_dequantized,
    read_folder,
    unpack_int32,
    vllm_fusion_conflicts,
    write_folder,
)

from .conftest import DEMO


def rtn(weight: torch.Tensor, bits: int, group: int, symmetric: bool,
        scale_dtype: torch.dtype = torch.float32) -> LinearQuant:
    """Round-to-nearest on compressed-tensors' min-max grid (range widened to hold 0; symmetric scale
    amax/((2^b-1)/2)), codes unsigned as LinearQuant takes them."""
    out, cols = weight.shape
    g = cols if group == -1 else group
    w = weight.detach().float().reshape(out, cols // g, g)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    top = (1 << bits) - 1
    if symmetric:
        scale = (torch.maximum(-lo, hi) / (top / 2)).clamp(min=1e-8).to(scale_dtype)
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int64)
    else:
        scale = ((hi - lo) / top).clamp(min=1e-8).to(scale_dtype)
        zero = torch.round(-lo / scale.float()).clamp(0, top).to(torch.int64)
    codes = torch.clamp(torch.round(w / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, top)
    return LinearQuant(codes.reshape(out, cols).to(torch.uint8), scale, None if symmetric else zero, bits, group,
                       symmetric)


def weights_args(q: LinearQuant) -> dict:
    group = q.group_size > 0
    return {"num_bits": q.wbits, "type": "int", "symmetric": q.symmetric, "dynamic": False,
            "strategy": "group" if group else "channel", "group_size": q.group_size if group else None}


# (a) packing round trips ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 9), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_then_unpack_gives_the_codes_back_for_every_width(bits, rows, n, seed):
    codes = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-n * bits // 32))
    assert torch.equal(unpack_int32(words, bits, n).long(), codes)


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([4, 8]), symmetric=st.booleans(), group=st.sampled_from([-1, 32, 64, 128]),
       out=st.integers(1, 40), n_groups=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_linear_round_trip_through_the_stored_tensors(bits, symmetric, group, out, n_groups, seed):
    gen = torch.Generator().manual_seed(seed)
    cols = group * n_groups if group > 0 else int(torch.randint(1, 300, (1,), generator=gen))
    shape = (out, 1 if group == -1 else n_groups)
    q = LinearQuant(torch.randint(0, 1 << bits, (out, cols), generator=gen), torch.rand(shape, generator=gen) + .1,
                    None if symmetric else torch.randint(0, 1 << bits, shape, generator=gen), bits, group, symmetric)
    stored = compress_linear(q)
    packed = stored["weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (out, -(-cols * bits // 32))
    assert stored["weight_shape"].tolist() == [out, cols] and stored["weight_scale"].shape == shape
    assert ("weight_zero_point" in stored) is (not symmetric)
    if not symmetric:
        assert stored["weight_zero_point"].dtype == torch.int32
        assert stored["weight_zero_point"].shape == (-(-out * bits // 32), shape[1])
    back = decompress_linear(stored, weights_args(q))
    assert torch.equal(back.codes.long(), q.codes.long()) and torch.equal(back.scales, q.scales)
    assert back.scheme == q.scheme
    if not symmetric:
        assert torch.equal(back.zeros.long(), q.zeros.long())
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), symmetric=st.booleans(), group=st.sampled_from([-1, 32, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_layout_equals_the_compressed_tensors_compressor(bits, symmetric, group, seed):
    """The package's own compress gives our tensors bit for bit, and its decompress our dequantization."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    if 32 % bits and ct_version() < (0, 18):
        return  # before 0.18 codes that straddle words were padded instead (PR #715); 2/4/8 bits never changed

    gen = torch.Generator().manual_seed(seed)
    q = rtn(torch.randn(24, 128, generator=gen), bits, group, symmetric)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights_args(q), format="pack-quantized")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    offset = 1 << (bits - 1)
    state = {"weight": q.dequantize(), "weight_scale": q.scales}
    if not symmetric:
        state["weight_zero_point"] = (q.zeros - offset).to(torch.int8)  # compressed-tensors' signed zero points
    theirs = compressor.compress(state, scheme)
    ours = compress_linear(q)
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert theirs[key].dtype == ours[key].dtype and torch.equal(theirs[key], ours[key]), key
    dense = compressor.decompress(ours, scheme)["weight"]
    torch.testing.assert_close(dense, q.dequantize(), rtol=0, atol=0)


def test_symmetric_zero_points_at_the_midpoint_are_dropped_and_others_refused():
    codes, scales = torch.zeros(2, 32, dtype=torch.int64), torch.ones(2, 1)
    assert LinearQuant(codes, scales, torch.full((2, 1), 8), 4, -1, True).zeros is None
    with pytest.raises(ValueError, match="symmetric"):
        LinearQuant(codes, scales, torch.full((2, 1), 7), 4, -1, True)
    with pytest.raises(ValueError, match="divide"):
        LinearQuant(codes, torch.ones(2, 1), None, 4, 24, True)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        LinearQuant(codes - 1, scales, None, 4, -1, True)


# (b) a tiny LLaMA through write_folder and our reader -------------------------------------------------------

def tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO)


def quantize(model, plan) -> dict[str, LinearQuant]:
    """``plan(name) -> (bits, group, symmetric) or None`` over the decoder's linears (lm_head stays float)."""
    results = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and plan(name) is not None:
            results[name] = rtn(module.weight, *plan(name))
    return results


def uniform(name):
    return 4, 32, True


def mixed(name):
    if "layers.1.self_attn.o_proj" in name:
        return None  # stays float: must appear in ignore
    if "self_attn" in name:
        return 4, 32, True
    if "down_proj" in name:
        return 4, 64, False
    return 8, -1, False  # gate/up: int8 per channel, asymmetric


@pytest.mark.parametrize("plan", [uniform, mixed])
def test_tiny_llama_folder_reads_back_to_the_dequantized_weights(tmp_path, plan):
    model = tiny_llama()
    results = quantize(model, plan)
    write_folder(model, tokenizer(), results, tmp_path)
    config, tensors, quant = read_folder(tmp_path)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    groups = qc["config_groups"]
    if plan is uniform:
        assert list(groups) == ["group_0"] and groups["group_0"]["targets"] == ["Linear"]
        assert qc["ignore"] == ["lm_head"]
        assert groups["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32,
                                                "strategy": "group", "dynamic": False}
    else:
        assert len(groups) == 3 and qc["ignore"] == ["model.layers.1.self_attn.o_proj", "lm_head"]
        assert sorted(t for g in groups.values() for t in g["targets"]) == sorted(results)
    assert set(quant) == set(results)
    for name, q in results.items():
        assert f"{name}.weight" not in tensors
        assert torch.equal(quant[name].codes.long(), q.codes.long()) and quant[name].scheme == q.scheme
    dense = read_dequantized(tmp_path)
    state = model.state_dict()
    for key in state:
        module = key.rpartition(".")[0]
        want = results[module].dequantize() if module in results and key.endswith(".weight") else state[key]
        torch.testing.assert_close(dense[key], want, rtol=0, atol=0)
    assert (tmp_path / "tokenizer.json").is_file() or (tmp_path / "tokenizer.model").is_file()


def test_tied_embeddings_are_written_once(tmp_path):
    model = tiny_llama(tied=True)
    write_folder(model, None, quantize(model, uniform), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.norm.weight" in keys


def test_fused_shards_with_different_schemes_are_refused_for_vllm(tmp_path):
    model = tiny_llama()
    results = quantize(model, lambda n: (8, -1, True) if n.endswith("k_proj") else (4, 32, True))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(vllm_fusion_conflicts(results, names)) == 2
    with pytest.raises(ValueError, match="fuses"):
        write_folder(model, None, results, tmp_path / "strict")
    write_folder(model, None, results, tmp_path / "hf", strict_vllm=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]


# (c) loading with transformers + compressed-tensors on the CPU ---------------------------------------------

def dequantized_model(model, results):
    for name, q in results.items():
        model.get_submodule(name).weight.data = q.dequantize(torch.float32)
    return model


def assert_loads_like_the_dequantized_model(folder, reference, **kwargs):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for name, module in reference.named_modules():  # after the first forward every layer holds float weights
        if isinstance(module, torch.nn.Linear):
            torch.testing.assert_close(loaded.get_submodule(name).weight, module.weight, rtol=0, atol=0)


def mixed_symmetric(name):
    return None if "layers.1.self_attn.o_proj" in name else (4, 32, True) if "self_attn" in name else \
        (4, 64, True) if "down_proj" in name else (8, -1, True)


def asymmetric(name):
    return 4, 32, False


def ct_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("compressed-tensors").split(".")[:3])


def write_and_load(folder, plan, tied=False, **kwargs):
    model = tiny_llama(tied)
    results = quantize(model, plan)
    write_folder(model, tokenizer(), results, folder)
    assert_loads_like_the_dequantized_model(folder, dequantized_model(model, results), **kwargs)


@pytest.mark.parametrize(("plan", "tied"), [(uniform, False), (mixed_symmetric, False), (uniform, True)])
def test_transformers_loads_symmetric_folders_on_cpu(tmp_path, plan, tied):
    """The default route: weights load packed, compressed-tensors decompresses them on the first forward."""
    pytest.importorskip("compressed_tensors")
    write_and_load(tmp_path, plan, tied)


def test_transformers_loads_an_asymmetric_folder_decompressed_at_load(tmp_path):
    """``dequantize=True`` decompresses each tensor while loading with the package's own decompressor (which
    unpacks zero points); transformers 5.25 applies one scheme to every dense layer there, so: one scheme."""
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    write_and_load(tmp_path, asymmetric, quantization_config=CompressedTensorsConfig(dequantize=True))


def test_transformers_loads_mixed_asymmetric_folders_by_default_route(tmp_path, request):
    """compressed-tensors 0.18-0.20.1 compress the empty model on the meta device before loading and leave its
    zero points unpacked ([out, groups] int8), so the packed ones on disk mismatch; 0.17.1 loads them."""
    pytest.importorskip("compressed_tensors")
    if ct_version() >= (0, 18):
        request.applymarker(pytest.mark.xfail(reason="compressed-tensors >= 0.18 leaves zero points unpacked on "
                                                     "the meta device (size mismatch on load)", strict=False))
    write_and_load(tmp_path, mixed)


def stories_plan(name):
    # hidden 64 divides into 32-groups; ffn 172 does not (172 = 4*43), so down_proj goes per channel (its 4-bit
    # rows pack into 21.5 words: the last word is half padding). Symmetric, so compressed-tensors 0.20 loads it.
    return (4, -1, True) if name.endswith("down_proj") else \
        (8, -1, True) if name.endswith(("gate_proj", "up_proj")) else (4, 32, True)


def stories_folder(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    results = quantize(model, stories_plan)
    write_folder(model, tokenizer(), results, folder)
    return model, results


def test_stories260k_round_trips(tmp_path):
    model, results = stories_folder(tmp_path)
    down = "model.layers.0.mlp.down_proj"
    assert results[down].codes.shape == (64, 172)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{down}.weight_packed").shape == (64, 22)  # 172 codes * 4 bits = 21.5 words
    config, _, _ = read_folder(tmp_path)
    assert len(config["quantization_config"]["config_groups"]) == 3
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    dense = read_dequantized(tmp_path)
    for name, q in results.items():
        torch.testing.assert_close(dense[f"{name}.weight"], q.dequantize(), rtol=0, atol=0)
        # round to nearest: every weight within half a step of its float value (a check of the grid)
        error = (dense[f"{name}.weight"] - model.get_submodule(name).weight).abs().amax(1, keepdim=True)
        assert bool((error <= q.scales.amax(1, keepdim=True) * 0.5001).all())


def test_stories260k_loads_with_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    model, results = stories_folder(tmp_path)
    assert_loads_like_the_dequantized_model(tmp_path, dequantized_model(model, results))
