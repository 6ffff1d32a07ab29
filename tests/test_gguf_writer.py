"""GGUF output (issue #37): our block packers decode bit for bit like gguf-py's reference decoder, GPTQ grids map to
Q4_0/Q8_0/Q4_1 exactly, and written llama GGUFs load back through transformers' GGUF loader with the logits of the
model they came from (stories260K, and a tiny LLaMA whose Q/K rows go through the rotary permutation)."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taylorprune.export import gguf_blocks as gb
from taylorprune.export.gguf_writer import choose_type, gguf_name, permute_rows, write_gguf, write_model_gguf
from taylorprune.modeling.gguf import materialize_buffers

from .conftest import DEMO

BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0]


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


@st.composite
def weights(draw):
    rows, blocks = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    w = draw(arrays(np.float32, (rows, blocks * 32), elements=st.floats(-1, 1, width=32)))
    zeros = draw(arrays(np.bool_, w.shape)) | (np.abs(w) < 1e-4)  # pruned weights; no degenerate tiny scales
    return np.where(zeros, np.float32(0), w * np.float32(scale)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(w=weights(), qtype=st.sampled_from(BLOCK_TYPES), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_gguf_decodes_our_blocks_bit_for_bit_like_our_own_decoder(w, qtype, weighted, seed):
    imp = np.random.default_rng(seed).random(w.shape[1]).astype(np.float32) + 0.01 if weighted else None
    raw = gb.quantize(w, qtype, imp)
    assert raw.shape == (w.shape[0], w.shape[1] // 32 * gb.BLOCK_BYTES[qtype]) and raw.dtype == np.uint8
    ours, ref = gb.dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype)
    assert ours.shape == w.shape
    np.testing.assert_array_equal(bits(ours), bits(ref))
    if gb.HOLDS_EXACT_ZERO[qtype] and imp is None:
        assert (ours[w == 0] == 0).all()  # pruned weights stay exactly zero on symmetric grids


@settings(max_examples=30, deadline=None)
@given(w=weights(), qtype=st.sampled_from(BLOCK_TYPES))
def test_plain_rounding_matches_llama_cpp_reference_bytes(w, qtype):
    np.testing.assert_array_equal(gb.quantize(w, qtype), gguf.quants.quantize(w, qtype))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_float_passthrough_decodes_like_gguf(qtype):
    w = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    raw = gb.quantize(w, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(bits(gb.dequantize(raw, qtype, w.shape)), bits(ref.reshape(w.shape)))
    np.testing.assert_allclose(ref, w, rtol=1e-2)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0], ids=lambda t: t.name)
def test_importance_weighted_search_lowers_the_weighted_error(qtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    imp = rng.gamma(0.5, size=128).astype(np.float32)
    err = {}
    for name, i in {"plain": None, "weighted": imp}.items():
        err[name] = float((imp * (gb.dequantize(gb.quantize(w, qtype, i), qtype) - w) ** 2).sum())
    assert err["weighted"] < err["plain"]


def _fp16_scales(rng, shape):
    return rng.uniform(1e-3, 0.1, shape).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("signed", [False, True])
def test_symmetric_4bit_group32_grid_maps_to_q4_0_exactly(signed):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (6, 96))
    codes[:, :7] = 8  # zeros
    scales = _fp16_scales(rng, (6, 3))
    want = np.repeat(scales, 32, axis=1) * (codes - 8).astype(np.float32)
    raw = gb.q4_0_from_sym_grid(codes - 8 if signed else codes, scales, signed=signed)
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, QT.Q4_0), want)
    np.testing.assert_array_equal(gb.dequantize(raw, QT.Q4_0), want)
    with pytest.raises(ValueError, match="fp16"):
        gb.q4_0_from_sym_grid(codes, scales + np.float32(1e-7))


def test_symmetric_8bit_grid_maps_to_q8_0_and_asymmetric_4bit_to_q4_1():
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (4, 64))
    scales = _fp16_scales(rng, (4, 2))
    raw = gb.q8_0_from_sym_grid(q, scales)
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, QT.Q8_0), np.repeat(scales, 32, axis=1) * q)

    codes = rng.integers(0, 16, (4, 64))
    steps = (rng.integers(1, 128, (4, 2)) / 1024).astype(np.float32)  # few mantissa bits: −scale·z is an fp16
    zeros = rng.integers(0, 16, (4, 2)).astype(np.float32)
    raw, change = gb.q4_1_from_asym_grid(codes, steps, zeros)
    want = np.repeat(steps, 32, axis=1) * (codes - np.repeat(zeros, 32, axis=1))
    np.testing.assert_allclose(gguf.quants.dequantize(raw, QT.Q4_1), want, rtol=0, atol=1e-6)
    assert change <= 1e-6
    with pytest.raises(ValueError, match="Q4_1 cannot represent"):
        gb.q4_1_from_asym_grid(codes, np.full((4, 2), 0.1, np.float32).astype(np.float16).astype(np.float32),
                               np.full((4, 2), 7.0, np.float32))


def test_type_map_and_names():
    assert choose_type("blk.0.attn_norm.weight", (64,), QT.Q4_0) == (QT.F32, None)
    t, warning = choose_type("blk.0.ffn_down.weight", (64, 172), QT.Q4_0)
    assert t == QT.F16 and "blk.0.ffn_down.weight" in warning
    assert choose_type("blk.0.ffn_up.weight", (172, 64), QT.Q4_0) == (QT.Q4_0, None)
    assert choose_type("output.weight", (512, 64), QT.Q4_0, {"output.weight": "Q8_0"})[0] == QT.Q8_0
    assert gguf_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    w = np.arange(16 * 3).reshape(16, 3)
    assert (permute_rows(w, 2)[:, 0] == [0, 12, 3, 15, 6, 18, 9, 21, 24, 36, 27, 39, 30, 42, 33, 45]).all()


# ------------------------------------------------------------------------------------------------- round trips
def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    materialize_buffers(model)  # transformers 5.25 leaves the rotary inv_freq on the meta device
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _with_our_weights(model, qtype):
    """A copy of ``model`` holding exactly what our writer stores (quantized, then our own dequantization)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            t, _ = choose_type(name, tuple(p.shape), qtype)
            w = p.detach().float().numpy()
            p.copy_(torch.from_numpy(gb.dequantize(gb.quantize(w, t), t, w.shape)))
    return clone


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(DEMO)))


X = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_stories260k_f32_gguf_loads_back_with_the_same_logits_and_metadata(tmp_path, stories):
    model, tok = stories
    report = write_model_gguf(tmp_path / "s.gguf", model, tok, qtype="F32")
    assert not report.fallbacks and set(report.types.values()) == {QT.F32}
    back = _load_gguf(tmp_path / "s.gguf")
    torch.testing.assert_close(_logits(back, X), _logits(model, X), rtol=0, atol=1e-5)

    fields = gguf.GGUFReader(tmp_path / "s.gguf").fields
    expect = {"llama.context_length": 2048, "llama.embedding_length": 64, "llama.block_count": 5,
              "llama.feed_forward_length": 172, "llama.attention.head_count": 8, "llama.attention.head_count_kv": 4,
              "llama.rope.dimension_count": 8, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 512,
              "general.file_type": 0, "general.quantization_version": 2, "tokenizer.ggml.model": "llama",
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0}
    assert {k: fields[k].contents() for k in expect} == expect
    assert fields["tokenizer.ggml.tokens"].contents()[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert fields["tokenizer.ggml.token_type"].contents()[:4] == [2, 3, 3, 6]
    from transformers import AutoTokenizer

    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    text = "Once upon a time, there was a little girl."
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]


def test_stories260k_q8_0_gguf_equals_the_model_holding_our_dequantized_weights(tmp_path, stories):
    model, tok = stories
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_model_gguf(tmp_path / "q.gguf", model, tok, qtype="Q8_0")
    # ffn_down's rows are 172 wide (its input is the FFN): no 32-blocks, so F16 and a warning naming it
    assert [report.types[f"blk.{i}.ffn_down.weight"] for i in range(5)] == [QT.F16] * 5
    assert any("blk.4.ffn_down.weight" in str(w.message) for w in caught) and len(report.fallbacks) == 5
    assert report.types["blk.0.ffn_gate.weight"] == report.types["token_embd.weight"] == QT.Q8_0
    assert report.types["blk.0.attn_norm.weight"] == QT.F32
    assert gguf.GGUFReader(tmp_path / "q.gguf").fields["general.file_type"].contents() == 7
    back = _load_gguf(tmp_path / "q.gguf")
    ours = _with_our_weights(model, QT.Q8_0)
    torch.testing.assert_close(_logits(back, X), _logits(ours, X), rtol=0, atol=1e-5)
    diff = (_logits(back, X) - _logits(model, X)).abs().mean()
    assert diff < 0.05, diff  # and Q8_0 stays close to the original


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q4_0, QT.Q5_0], ids=lambda t: t.name)
def test_tiny_llama_round_trip_covers_the_q_k_permutation(tmp_path, stories, qtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=500.0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    report = write_model_gguf(tmp_path / "t.gguf", model, stories[1], qtype=qtype)
    assert not report.fallbacks
    back = _load_gguf(tmp_path / "t.gguf")
    assert back.config.rope_parameters["rope_theta"] == 500.0
    want = _logits(model if qtype == QT.F32 else _with_our_weights(model, qtype), X)
    torch.testing.assert_close(_logits(back, X), want, rtol=0, atol=1e-5)


def test_gptq_packed_q_k_blocks_are_permuted_like_float_ones(tmp_path, stories):
    """Pre-packed Q4_0 blocks from a GPTQ grid (HF row order) go through the same Q/K permutation."""
    model, tok = stories
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(4)
    packed = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        rows, cols = sd[name].shape
        codes, scales = rng.integers(0, 16, (rows, cols)), _fp16_scales(rng, (rows, cols // 32))
        packed[name] = (QT.Q4_0, gb.q4_0_from_sym_grid(codes, scales))
        sd[name] = torch.from_numpy(np.repeat(scales, 32, axis=1) * (codes - 8).astype(np.float32))
    write_gguf(tmp_path / "g.gguf", model.config, model.state_dict(), tok, qtype="F32", packed=packed)
    ref = type(model)(model.config).eval()
    ref.load_state_dict(sd)
    torch.testing.assert_close(_logits(_load_gguf(tmp_path / "g.gguf"), X), _logits(ref, X), rtol=0, atol=1e-5)
