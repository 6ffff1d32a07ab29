"""GGUF output for Gemma 3 (text, ``Gemma3ForCausalLM``) as llama.cpp's ``gemma3``: a tiny random Gemma 3 (5 sliding
layers with a window of 4 : 1 global, q/k norms, one KV head, tied embeddings, random norm weights so that the
+1 of Gemma's norms matters) written as F32 loads back through transformers' GGUF loader with the model's logits; a
block type loads back as our own dequantization; a uniformly narrowed model writes and loads; uneven widths and
what llama.cpp's graph would compute differently are one-line errors with nothing written; `export`/`run --format
gguf` write it, a GGUF-loaded one is re-exported with its source's tokenizer metadata; llama.cpp (when installed)
runs the file with transformers' logits."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.export import gguf_blocks as gb
from taylorprune.export.gguf_arch import GEMMA3
from taylorprune.export.gguf_format import linears
from taylorprune.export.gguf_writer import choose_type, gguf_name, write_model_gguf
from taylorprune.modeling import loading
from taylorprune.modeling.gguf import materialize_buffers

from .conftest import DEMO, TOKENIZER_FILES, VALID

runner = CliRunner()
X = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than the window of 4
NORMS = ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# llama.cpp's CPU GELU reads a 16-bit lookup table (GGML_GELU_FP16): F32 logits agree to ~5e-4 (2e-4 with that
# rounding simulated in PyTorch), not to llama's 1e-4
ROPE_LINEAR = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e4},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
LLAMACPP_F32 = 2e-3


def gemma(seed: int = 0, **overrides):
    """A tiny random Gemma3ForCausalLM, its norm weights drawn too (Gemma initialises them at 0, i.e. scale 1)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**{**config, **overrides}), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


def _logits(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _transformers(path: Path, **config):
    """The file through transformers' own GGUF loader (``config``: what it does not read from the file)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **config)
    materialize_buffers(model)
    return model.eval()


def _with_our_weights(model, qtype: QT):
    """A copy of ``model`` holding what the file holds: 2-D tensors rounded and decoded by us, norms + 1 − 1."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            w = p.detach().numpy()
            if w.ndim == 1:
                p.copy_(torch.from_numpy((w + np.float32(1)) - np.float32(1)))
                continue
            t, _ = choose_type(gguf_name(name, GEMMA3), w.shape, qtype)
            p.copy_(torch.from_numpy(gb.dequantize(gb.quantize(w, t), t, w.shape)))
    return clone


def _fewer_heads(model, heads: int):
    """``model`` (changed in place) with its first ``heads`` query heads in every layer."""
    from torch import nn

    d = model.config.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        q, o = attn.q_proj, attn.o_proj
        attn.q_proj = nn.Linear(q.in_features, heads * d, bias=False)
        attn.q_proj.weight.data = q.weight.data[: heads * d].clone()
        attn.o_proj = nn.Linear(heads * d, o.out_features, bias=False)
        attn.o_proj.weight.data = o.weight.data[:, : heads * d].clone()
        attn.num_key_value_groups = heads // model.config.num_key_value_heads
    model.config.num_attention_heads = heads
    return model


def _narrow(model, ffn: list[int], heads: int | None = None):
    """A copy of ``model`` keeping the first ``ffn[i]`` MLP channels of layer i (and the first ``heads`` query
    heads), as structured pruning leaves it."""
    from torch import nn

    model = copy.deepcopy(model)
    for layer, width in zip(model.model.layers, ffn, strict=True):
        mlp = layer.mlp
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        mlp.gate_proj, mlp.up_proj = (nn.Linear(gate.in_features, width, bias=False) for _ in range(2))
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate.weight.data[:width], up.weight.data[:width]
        mlp.down_proj = nn.Linear(width, down.out_features, bias=False)
        mlp.down_proj.weight.data = down.weight.data[:, :width].clone()
    if len(set(ffn)) == 1:
        model.config.intermediate_size = ffn[0]
    return (model if heads is None else _fewer_heads(model, heads)).eval()


def _folder(path: Path, model) -> Path:
    """``model`` saved as an HF folder with the stories260K tokenizer (vocabulary 512)."""
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, path / name)
    return path


# --------------------------------------------------------------------------------------------- round trips
def test_f32_gguf_loads_back_through_transformers_with_the_models_logits(tmp_path, tok):
    model = gemma()
    path = tmp_path / "g.gguf"
    report = write_model_gguf(path, model, tok, qtype="F32")
    assert not report.fallbacks and set(report.types.values()) == {QT.F32}
    want = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{t}.weight" for i in range(6)
                                                           for t in NORMS + LINEARS}
    assert set(report.types) == want  # tied: no output.weight

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("gemma3.", "general.arch"))}
    assert fields == {"general.architecture": "gemma3", "gemma3.context_length": 128,
                      "gemma3.embedding_length": 64, "gemma3.block_count": 6, "gemma3.feed_forward_length": 128,
                      "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1,
                      "gemma3.rope.dimension_count": 16, "gemma3.attention.key_length": 16,
                      "gemma3.attention.value_length": 16, "gemma3.rope.freq_base": 1e6,
                      "gemma3.attention.sliding_window": 4, "gemma3.vocab_size": 512,
                      "gemma3.attention.layer_norm_rms_epsilon": pytest.approx(1e-6)}
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    norm = model.model.layers[2].pre_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.2.ffn_norm.weight"], norm + np.float32(1))  # Gemma's 1 + w
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], q)  # neox RoPE: HF's row order, no permutation

    # transformers' loader keeps Gemma3TextConfig's query_pre_attn_scalar (256), which no GGUF key states
    assert _transformers(path).config.query_pre_attn_scalar == 256
    back = _transformers(path, query_pre_attn_scalar=16)
    assert back.config.layer_types == model.config.layer_types and back.config.sliding_window == 4
    assert back.config.rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=1e-5)
    ours = loading.load(str(path), dtype="float32").model  # our loader sets it as llama.cpp computes: head_dim
    assert ours.config.query_pre_attn_scalar == 16
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_a_block_type_loads_back_as_our_own_dequantization(tmp_path, tok, qtype):
    model = gemma(1)
    report = write_model_gguf(tmp_path / "q.gguf", model, tok, qtype=qtype)
    assert not report.fallbacks and report.types["token_embd.weight"] == report.types["blk.5.ffn_down.weight"] == qtype
    assert report.types["blk.0.attn_q_norm.weight"] == QT.F32
    back = _transformers(tmp_path / "q.gguf", query_pre_attn_scalar=16)
    torch.testing.assert_close(_logits(back), _logits(_with_our_weights(model, qtype)), rtol=0, atol=1e-5)


def test_q4_k_m_applies_llamas_rule_by_tensor_name(tmp_path, tok):
    """Tied embeddings: token_embd is the output (Q6_K, here Q8_0: 64 is no multiple of 256); attn_v/ffn_down Q6_K
    in the layers use_more_bits names; the widths 64/128 take no K-quant, so Q4_K falls back to Q5_0, Q6_K to Q8_0."""
    report = write_model_gguf(tmp_path / "k.gguf", gemma(), tok, qtype="Q4_K_M")
    assert report.types["token_embd.weight"] == QT.Q8_0
    assert report.types["blk.2.attn_v.weight"] == report.types["blk.5.ffn_down.weight"] == QT.Q8_0  # Q6_K
    assert report.types["blk.0.attn_v.weight"] == report.types["blk.1.attn_q.weight"] == QT.Q5_0  # Q4_K
    assert gguf.GGUFReader(tmp_path / "k.gguf").fields["general.file_type"].contents() == 15


def test_linear_rope_scaling_is_written_and_our_loader_restores_it(tmp_path, tok):
    model = gemma(2, rope_parameters=copy.deepcopy(ROPE_LINEAR))
    write_model_gguf(tmp_path / "r.gguf", model, tok, qtype="F32")
    fields = gguf.GGUFReader(tmp_path / "r.gguf").fields
    assert fields["gemma3.rope.scaling.type"].contents() == "linear"
    assert fields["gemma3.rope.scaling.factor"].contents() == 4.0 and fields["gemma3.rope.freq_base"].contents() == 5e4
    ours = loading.load(str(tmp_path / "r.gguf"), dtype="float32").model
    assert ours.config.rope_parameters["full_attention"]["factor"] == 4.0
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=1e-5)


def test_a_uniformly_narrowed_model_writes_and_loads(tmp_path, tok):
    model = _narrow(gemma(3), [96] * 6, heads=1)
    write_model_gguf(tmp_path / "c.gguf", model, tok, qtype="F32")
    fields = gguf.GGUFReader(tmp_path / "c.gguf").fields
    assert fields["gemma3.feed_forward_length"].contents() == 96
    assert fields["gemma3.attention.head_count"].contents() == 1
    back = loading.load(str(tmp_path / "c.gguf"), dtype="float32").model
    assert back.config.intermediate_size == 96 and back.config.num_attention_heads == 1
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- refusals
def test_uneven_widths_are_one_line_naming_them_and_nothing_is_written(tmp_path, tok):
    path = tmp_path / "u.gguf"
    with pytest.raises(ValueError) as err:
        write_model_gguf(path, _narrow(gemma(), [96, 128, 128, 64, 128, 128]), tok, qtype="F32")
    message = str(err.value)
    assert "\n" not in message and "gemma3" in message and "[96, 128, 128, 64, 128, 128]" in message, message
    assert not path.exists()


@pytest.mark.parametrize(("overrides", "words"), [
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar is 256"),
    ({"layer_types": ["sliding_attention", "full_attention"] * 3}, "SGSGSG"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}}, "10000"),
], ids=["scale", "pattern", "softcap", "local-base"])
def test_what_llamacpps_graph_computes_otherwise_is_one_line(tmp_path, tok, overrides, words):
    path = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="llama.cpp's gemma3 cannot run this model") as err:
        write_model_gguf(path, gemma(**overrides), tok)
    assert words in str(err.value) and "\n" not in str(err.value) and not path.exists()


# --------------------------------------------------------------------------------------------- the CLI
def test_export_writes_gemma3_and_reexports_a_gguf_with_its_tokenizer_metadata(tmp_path):
    model = gemma(4)
    src = _folder(tmp_path / "src", model)
    res = runner.invoke(app, ["export", "--model", str(src), "--format", "gguf", "--gguf-type", "Q8_0",
                              "--output", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    first = tmp_path / "a" / "model.gguf"
    back = loading.load(str(first), dtype="float32")
    assert back.model.config.model_type == "gemma3_text" and back.tokenizer_gguf == str(first)
    torch.testing.assert_close(_logits(back.model), _logits(_with_our_weights(model, QT.Q8_0)), rtol=0, atol=1e-5)
    stored = {s.name: s for s in linears(tmp_path / "a")}  # read back under HF names, norms without the + 1
    norm = "model.layers.1.post_feedforward_layernorm.weight"
    torch.testing.assert_close(stored[norm].load(), model.get_parameter(norm).detach(), rtol=0, atol=1e-6)

    res = runner.invoke(app, ["export", "--model", str(first), "--format", "gguf", "--gguf-type", "F32",
                              "--output", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output

    def tokenizer_fields(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}

    assert tokenizer_fields(tmp_path / "b" / "model.gguf") == tokenizer_fields(first)


def test_a_model_llamacpp_computes_otherwise_is_one_line_from_the_cli_before_any_work(tmp_path):
    src = _folder(tmp_path / "src", gemma(query_pre_attn_scalar=256))
    for command in (["export"], ["run", "--calib-file", str(VALID), "--method", "wanda", "--sparsity", "0.5"]):
        res = runner.invoke(app, [*command, "--model", str(src), "--format", "gguf", "--output", str(tmp_path / "o")])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
        assert "--format gguf: llama.cpp's gemma3 cannot run this model: query_pre_attn_scalar is 256" in errors[0]
        assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> Path:
    """`run --structure neurons --format gguf` on the tiny Gemma 3: every layer's FFN 128 -> 96."""
    root = tmp_path_factory.mktemp("gemma3")
    src = _folder(root / "src", gemma(5))
    res = runner.invoke(app, ["run", "--model", str(src), "--calib-file", str(VALID), "--nsamples", "4", "--seqlen",
                              "32", "--method", "wanda", "--structure", "neurons", "--structure-ratio", "0.25",
                              "--format", "gguf", "--gguf-type", "F32", "--output", str(root / "out")])
    assert res.exit_code == 0, res.output
    return root / "out" / "model.gguf"


def test_run_writes_a_compact_gemma3(compact):
    assert gguf.GGUFReader(compact).fields["gemma3.feed_forward_length"].contents() == 96
    assert loading.load(str(compact)).model.model.layers[0].mlp.up_proj.out_features == 96


# --------------------------------------------------------------------------------------------- llama.cpp
@pytest.mark.parametrize("kind", ["dense", "rope-linear", "compact"])
def test_llamacpp_runs_our_gemma3_with_the_logits_of_transformers(tmp_path, tok, compact, kind):
    """The window (4 of 33 tokens), the global layer and its linear RoPE scaling as transformers computes them."""
    pytest.importorskip("llama_cpp")
    from .test_llamacpp import PROMPT, _llama, _llamacpp_logits, _relative

    path = compact
    if kind != "compact":
        path = tmp_path / "g.gguf"
        rope = {"rope_parameters": copy.deepcopy(ROPE_LINEAR)} if kind == "rope-linear" else {}
        write_model_gguf(path, gemma(6, **rope), tok, qtype="F32")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = loading.load(str(path), dtype="float32").model(input_ids=ids).logits[0].numpy()
    got = _llamacpp_logits(path, ids[0].tolist())
    assert got.shape == want.shape
    assert _relative(got, want) < LLAMACPP_F32, _relative(got, want)
    llm = _llama(path)
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids[0].tolist()  # the vocabulary we wrote
    finally:
        llm.close()
