"""Q4_K / Q6_K (issue #37): our super-block packers decode bit for bit like gguf-py's reference decoder and our own,
round with sane errors (Q6_K well below Q4_K), honour importance, fall back as llama.cpp does on widths 256 does
not divide, and ``--gguf-type Q4_K_M`` writes llama.cpp's per-tensor mix — on a tiny LLaMA whose widths are
multiples of 256 and on stories260K (widths 64 and 172: every K-quant falls back) — loading back through
transformers' GGUF loader with exactly our decoder's values."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.export import gguf_blocks as gb
from taylorprune.export.gguf_mix import q4_k_m_types, use_more_bits
from taylorprune.export.gguf_writer import choose_type, hf_name, write_model_gguf
from taylorprune.modeling import loading

from .conftest import DEMO, TOKENIZER_FILES, VALID

K_TYPES = [QT.Q4_K, QT.Q6_K]


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


@st.composite
def weights(draw):
    """[rows, 256·k] weights: Gaussian or heavy-tailed, three magnitudes, pruned entries, whole rows of zeros and
    whole 16/32-weight sub-blocks of zeros (the degenerate groups of the scale searches)."""
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_t(draw(st.sampled_from([3, 100])), (rows, 256 * blocks)).astype(np.float32)
    w *= np.float32(draw(st.sampled_from([1e-3, 1.0, 300.0])))
    w[rng.random(w.shape) < draw(st.sampled_from([0.0, 0.5, 0.9]))] = 0
    if draw(st.booleans()):
        w[rng.integers(rows)] = 0
    if draw(st.booleans()):
        start = 16 * rng.integers(w.shape[1] // 16)
        w[:, start:start + 16] = 0
    if draw(st.booleans()):
        w = np.abs(w)  # one-signed groups: the min search's "min > 0 -> 0" branch
    return w


@settings(max_examples=60, deadline=None)
@given(w=weights(), qtype=st.sampled_from(K_TYPES), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_k_quants_decode_bit_for_bit_like_gguf_and_our_decoder(w, qtype, weighted, seed):
    imp = np.random.default_rng(seed).gamma(0.5, size=w.shape[1]).astype(np.float32) + 1e-3 if weighted else None
    raw = gb.quantize(w, qtype, imp)
    assert raw.dtype == np.uint8 and raw.shape == (w.shape[0], w.shape[1] // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    ours, ref = gb.dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype)
    assert ours.shape == w.shape
    np.testing.assert_array_equal(bits(ours), bits(ref))
    assert np.isfinite(ours).all()
    assert (ours[(w == 0).all(axis=1)] == 0).all()  # rows of zeros stay zeros in both types
    if qtype == QT.Q6_K:
        assert (ours[w == 0] == 0).all()  # q = 32 is an exact 0: pruned weights stay 0
    scale = np.abs(w).max(axis=1, keepdims=True)
    # no wild values; importance-weighted fits may give a low-weight column a coarser value, never past the row's max
    assert (np.abs(ours - w) <= (1.0 if weighted else 0.25) * scale + 1e-30).all()


def test_quantization_errors_are_sane():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    rmse = {t: float(np.sqrt(((gb.dequantize(gb.quantize(w, t), t) - w) ** 2).mean()))
            for t in (QT.Q4_0, QT.Q4_K, QT.Q6_K)}
    assert rmse[QT.Q6_K] < 0.3 * rmse[QT.Q4_K]  # 2 more bits: ~4x smaller steps
    assert rmse[QT.Q4_K] < rmse[QT.Q4_0] and rmse[QT.Q4_K] < 0.08 and rmse[QT.Q6_K] < 0.02


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_importance_weighted_search_lowers_the_weighted_error(qtype):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    imp = rng.gamma(0.5, size=512).astype(np.float32)
    err = {name: float((imp * (gb.dequantize(gb.quantize(w, qtype, i), qtype) - w) ** 2).sum())
           for name, i in {"plain": None, "weighted": imp}.items()}
    assert err["weighted"] < 0.9 * err["plain"]


def test_widths_256_does_not_divide_fall_back_like_llama_cpp():
    assert choose_type("blk.0.attn_q.weight", (512, 512), QT.Q4_K) == (QT.Q4_K, None)
    t, warning = choose_type("blk.0.attn_q.weight", (64, 64), QT.Q4_K)
    assert t == QT.Q5_0 and "blk.0.attn_q.weight" in warning and "Q5_0 instead of Q4_K" in warning
    assert choose_type("blk.2.attn_v.weight", (32, 64), QT.Q6_K)[0] == QT.Q8_0
    t, warning = choose_type("blk.1.ffn_down.weight", (64, 172), QT.Q4_K)  # nor 32: F16
    assert t == QT.F16 and "blk.1.ffn_down.weight" in warning


def test_q4_k_m_rule_is_llama_cpps():
    more = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # a 32-layer model (LLaMA-7B)
    assert [i for i in range(32) if use_more_bits(i, 32)] == more
    types = q4_k_m_types(32, 4096, tied=False)
    assert types.pop("output.weight") == QT.Q6_K
    assert types == {f"blk.{i}.{t}.weight": QT.Q6_K for i in more for t in ("attn_v", "ffn_down")}
    assert q4_k_m_types(5, 64, tied=True) == {"token_embd.weight": QT.Q8_0, **{
        f"blk.{i}.{t}.weight": QT.Q6_K for i in (2, 4) for t in ("attn_v", "ffn_down")}}


# ------------------------------------------------------------------------------------------------- round trips
def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _decoded_in_hf_order(path: Path, config) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF decoded by our decoder, under its HF name, Q/K rows back in HF order."""
    head_dim = config.hidden_size // config.num_attention_heads
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        w = gb.dequantize(np.ascontiguousarray(t.data).view(np.uint8), QT(t.tensor_type), shape)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = _unpermute(w, shape[0] // head_dim)
        out[hf_name(t.name)] = w
    return out


def _assert_loads_as_decoded(path: Path):
    model = loading.load(str(path)).model
    ours = _decoded_in_hf_order(path, model.config)
    params = dict(model.named_parameters())
    for name, w in ours.items():
        assert torch.equal(params[name].detach().float(), torch.from_numpy(w.copy())), name


def _types(path: Path) -> dict[str, QT]:
    return {t.name: QT(t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}


def _wide_llama(folder: Path) -> Path:
    """A random LLaMA with every width a multiple of 256 (8 layers: use_more_bits picks 0, 3, 6, 7)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, folder / name)
    return folder


def _want_q4_k_m(names, n_layer: int, fallback: dict | None = None) -> dict[str, QT]:
    want = {}
    for name in names:
        if "norm" in name:
            want[name] = QT.F32
        elif name == "output.weight" or (any(f".{t}." in name for t in ("attn_v", "ffn_down"))
                                          and use_more_bits(int(name.split(".")[1]), n_layer)):
            want[name] = QT.Q6_K
        else:
            want[name] = QT.Q4_K
    return {n: (fallback or {}).get(n, t) for n, t in want.items()}


def test_q4_k_m_on_widths_of_256_is_the_rule_and_loads_back_as_decoded(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _wide_llama(tmp_path / "wide")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings: every width divides
        report = write_model_gguf(tmp_path / "m.gguf", model, AutoTokenizer.from_pretrained(str(folder)),
                                  qtype="Q4_K_M")
    assert not report.fallbacks
    types = _types(tmp_path / "m.gguf")
    assert types == _want_q4_k_m(types, 8)
    assert sorted(n for n, t in types.items() if t == QT.Q6_K and n != "output.weight") == sorted(
        f"blk.{i}.{t}.weight" for i in (0, 3, 6, 7) for t in ("attn_v", "ffn_down"))
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M
    _assert_loads_as_decoded(tmp_path / "m.gguf")


RUN = ["--method", "wanda", "--sparsity", "0.5", "--calib-file", str(VALID), "--nsamples", "4", "--seqlen", "64",
       "--format", "gguf", "--gguf-type", "Q4_K_M"]


@pytest.mark.slow
def test_a_pruned_run_writes_q4_k_m_that_loads_back_as_our_decoder_reads_it(tmp_path):
    """The CLI on the wide LLaMA: the rule exactly, Q6_K keeps pruned weights 0, Q4_K only near 0 (a warning)."""
    folder = _wide_llama(tmp_path / "wide")
    result = CliRunner().invoke(app, ["run", "--model", str(folder), *RUN, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "model.gguf"
    types = _types(path)
    assert types == _want_q4_k_m(types, 8)
    _assert_loads_as_decoded(path)
    decoded = _decoded_in_hf_order(path, loading.load(str(path)).model.config)
    down0 = decoded["model.layers.0.mlp.down_proj.weight"]  # Q6_K: half of it exactly 0
    assert abs((down0 == 0).mean() - 0.5) < 1e-9
    report = json.loads((tmp_path / "out" / "taylorprune_report.json").read_text())
    assert any("near 0, not exactly 0" in w for w in report["warnings"])


@pytest.mark.slow
def test_stories260k_q4_k_m_falls_back_per_tensor(tmp_path):
    """Widths 64 (no 256) and 172 (no 32): Q4_K -> Q5_0, Q6_K -> Q8_0, ffn_down F16; output.weight Q8_0 by the
    rule itself (n_embd 64)."""
    result = CliRunner().invoke(app, ["run", "--model", "demo", *RUN, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "model.gguf"
    types = _types(path)
    fallback = {n: QT.F16 if "ffn_down" in n else {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}[t]
                for n, t in _want_q4_k_m(types, 5).items() if t != QT.F32}
    assert types == _want_q4_k_m(types, 5, fallback)
    assert types["blk.2.attn_v.weight"] == types["blk.4.attn_v.weight"] == types["output.weight"] == QT.Q8_0
    assert types["blk.0.attn_v.weight"] == types["token_embd.weight"] == QT.Q5_0
    _assert_loads_as_decoded(path)
