"""llama.cpp as a measuring runtime (``--runtime llamacpp``): our GGUF files load in llama.cpp and its logits agree
with transformers' logits of the same file; llama-perplexity's protocol; speed of two files; the one-line error
without the extra. Tests that need llama-cpp-python skip without it (``pip install "taylorprune[llamacpp]"``); the
protocol's arithmetic and the error run everywhere."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.evaluate import llamacpp
from taylorprune.evaluate.perplexity import PerplexityOptions, eval_text
from taylorprune.export.gguf_writer import write_gguf, write_model_gguf
from taylorprune.modeling import loading

from .conftest import DEMO, VALID

runner = CliRunner()
RUN = ["--calib-file", str(VALID), "--nsamples", "4", "--seqlen", "64"]
GRID = ["--quantize", "gptq", "--wbits", "4", "--group-size", "32",
        "--targets", "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"]
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her"
# max |llama.cpp − transformers| / max |transformers| of the logits of one prompt, per file. F32: both compute in fp32.
# The others: llama.cpp multiplies Q4_0/Q8_0 blocks with activations it rounds to Q8_0 blocks, and F16 tensors with
# activations rounded to F16, where transformers dequantizes the weights and keeps fp32 activations.
TOLERANCE = {"F32": 1e-4, "Q8_0": 2e-2, "Q4_0": 3e-2}


def one_line(res, code: int = 2) -> str:
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == code and len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


@pytest.fixture(scope="module")
def lib():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """stories260K written by `taylorprune run --format gguf`: F32, the GPTQ 4-bit group-32 grid packed as Q4_0
    (the other tensors F16), and llama.cpp's Q8_0 rounding."""
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("gguf")
    runs = {"F32": ["--method", "wanda", "--sparsity", "0.5", "--gguf-type", "F32"],
            "Q4_0": ["--method", "sparsegpt", "--sparsity", "0.5", *GRID],
            "Q8_0": ["--method", "wanda", "--sparsity", "0.5", "--gguf-type", "Q8_0"]}
    out = {}
    for name, args in runs.items():
        res = runner.invoke(app, ["run", "--model", "demo", *RUN, *args, "--format", "gguf",
                                  "--output", str(root / name)])
        assert res.exit_code == 0, res.output
        out[name] = root / name / "model.gguf"
    return out


def _llama(path: Path, n_ctx: int = 128):
    """The file in llama.cpp with an F32 KV cache (llama.cpp's default F16 cache alone moves F32 logits by ~1e-3)."""
    lib = pytest.importorskip("llama_cpp")
    return llamacpp.load(path, n_ctx, llamacpp.RuntimeOptions(runtime="llamacpp"), logits_all=True,
                         type_k=lib.GGML_TYPE_F32, type_v=lib.GGML_TYPE_F32)



def _llamacpp_logits(path, ids: list[int]):
    """llama.cpp's logits of ``ids`` for the file at ``path`` (the model closed afterwards)."""
    llm = _llama(path)
    try:
        return llamacpp.logits(llm, ids).copy()
    finally:
        llm.close()

def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------------------------------ everywhere
def test_without_the_extra_the_runtime_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as when it is not installed
    gguf = str(DEMO / "stories260K.gguf")
    for args in (["eval", "--model", gguf], ["speed", "--model", gguf, "--baseline", gguf]):
        line = one_line(runner.invoke(app, [*args, "--runtime", "llamacpp"]))
        assert "llama-cpp-python" in line and 'pip install "taylorprune[llamacpp]"' in line, line


def test_llamacpp_flags_belong_to_the_llamacpp_runtime():
    line = one_line(runner.invoke(app, ["eval", "--model", "demo", "--llamacpp-threads", "2"]))
    assert "--llamacpp-threads applies to --runtime llamacpp" in line


def test_the_protocol_scores_the_second_half_of_each_chunk_after_bos():
    vocab, n_ctx, bos = 11, 8, 1
    tokens = [bos, *range(2, 2 + 8 * 3 + 5)]
    seen = []

    def uniform(chunk):  # every next token equally likely: the NLL of each scored token is log(vocab)
        seen.append(list(chunk))
        return np.zeros((len(chunk), vocab), np.float32)

    record = llamacpp.chunk_perplexity([t % vocab for t in tokens], n_ctx, bos, uniform)
    assert record["windows"] == 3 and record["tokens"] == 24 and record["scored_tokens"] == 3 * (8 - 4 - 1)
    assert math.isclose(record["perplexity"], vocab, rel_tol=1e-12)
    assert all(chunk[0] == bos for chunk in seen)  # every chunk starts with BOS, as llama-perplexity's
    assert seen[1][1:] == [t % vocab for t in tokens[9:16]]

    logits = np.zeros((n_ctx, vocab))
    chunk = list(range(n_ctx))
    for j in range(n_ctx - 1):
        logits[j, chunk[j + 1]] = 5.0  # position j predicts token j + 1 confidently
    logits[n_ctx // 2 - 1, 0] = 50.0  # the last position of the first half is not scored
    nll = llamacpp.second_half_nll(logits, chunk)
    assert len(nll) == n_ctx - n_ctx // 2 - 1
    assert np.allclose(nll, math.log(1 + (vocab - 1) * math.exp(-5.0)))

    with pytest.raises(Exception, match="needs at least 16"):
        llamacpp.chunk_perplexity(list(range(15)), n_ctx, None, uniform)


# ------------------------------------------------------------------------------------------ llama.cpp
@pytest.mark.parametrize("kind", ["F32", "Q4_0", "Q8_0"])
def test_our_gguf_loads_in_llamacpp_with_the_logits_of_transformers(files, kind):
    loaded = loading.load(str(files[kind]))
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits[0].float().numpy()
    llm = _llama(files[kind])
    try:
        got = llamacpp.logits(llm, ids[0].tolist()).copy()
        assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids[0].tolist()  # tokenizer metadata read alike
    finally:
        llm.close()
    assert got.shape == want.shape
    assert _relative(got, want) < TOLERANCE[kind], _relative(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_per_layer_widths_load_in_llamacpp(tmp_path, lib):
    """A GGUF whose layers have different FFN widths (per-layer ``feed_forward_length``, as our writer writes a
    model pruned to uneven widths) runs in llama.cpp as PyTorch runs the same shrunken model."""
    loaded = loading.load("demo", dtype="float32")
    model = loaded.model
    for i, width in enumerate((172, 129, 96, 160, 64)):
        mlp = model.model.layers[i].mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Linear(old.in_features, width, bias=False))
            getattr(mlp, name).weight.data = old.weight.data[:width].clone()
        old = mlp.down_proj
        mlp.down_proj = nn.Linear(width, old.out_features, bias=False)
        mlp.down_proj.weight.data = old.weight.data[:, :width].clone()
    path = tmp_path / "uneven.gguf"
    write_gguf(path, model.config, model.state_dict(), loaded.tokenizer, qtype="F32")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
    got = _llamacpp_logits(path, ids[0].tolist())
    assert _relative(got, want) < TOLERANCE["F32"], _relative(got, want)


@pytest.mark.parametrize(("structure", "ratio"), [("heads", "0.5"), ("neurons", "0.25")])
def test_a_compact_model_loads_in_llamacpp_with_the_logits_of_transformers(tmp_path, lib, structure, ratio):
    """Fewer heads (4 of 8: embedding / heads is no longer the head size) or a narrower FFN, same in every layer."""
    res = runner.invoke(app, ["run", "--model", "demo", *RUN, "--method", "wanda", "--structure", structure,
                              "--structure-ratio", ratio, "--format", "gguf", "--gguf-type", "F32",
                              "--output", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    path = tmp_path / "c" / "model.gguf"
    loaded = loading.load(str(path))
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits[0].float().numpy()
    got = _llamacpp_logits(path, ids[0].tolist())
    assert _relative(got, want) < TOLERANCE["F32"], _relative(got, want)


def test_perplexity_follows_llama_perplexity_and_matches_transformers(files, tmp_path):
    """`eval --runtime llamacpp` on the F32 file: the same number as transformers' logits of the same chunks,
    scored by the same rule (second half of each chunk, BOS first)."""
    out = tmp_path / "ppl.json"
    res = runner.invoke(app, ["eval", "--model", str(files["F32"]), "--runtime", "llamacpp", "--seqlen", "128",
                              "--max-windows", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "perplexity in llama.cpp" in res.output
    record = json.loads(out.read_text())
    assert record["runtime"] == "llamacpp" and record["protocol"] == llamacpp.PROTOCOL
    assert record["windows"] == 4 and record["seqlen"] == 128 and record["scored_tokens"] == 4 * 63
    assert record["metrics"]["perplexity"] == record["perplexity"] and record["tokenizer"].startswith("gguf:")

    loaded = loading.load(str(files["F32"]))
    body, _ = eval_text(None, None)
    llm = _llama(files["F32"])
    try:
        tokens = llm.tokenize(body.encode(), add_bos=True)
    finally:
        llm.close()
    assert tokens[:50] == loaded.tokenizer(body[:2000]).input_ids[:50]  # llama.cpp tokenizes as transformers does

    def torch_logits(chunk):
        with torch.no_grad():
            return loaded.model(input_ids=torch.tensor([chunk])).logits[0].numpy()

    want = llamacpp.chunk_perplexity(tokens, 128, record["bos"], torch_logits, 4)
    # the CLI runs llama.cpp's defaults (an F16 KV cache: ~4e-4 here); with an F32 cache the same chunks agree to 1e-5
    assert math.isclose(record["perplexity"], want["perplexity"], rel_tol=2e-3), (record["perplexity"], want)
    llm = _llama(files["F32"])
    try:
        exact = llamacpp.chunk_perplexity(tokens, 128, record["bos"], lambda c: llamacpp.logits(llm, c), 4)
    finally:
        llm.close()
    assert math.isclose(exact["perplexity"], want["perplexity"], rel_tol=1e-5), (exact, want)


def test_perplexity_of_the_bundled_llama2c_conversion_runs(lib):
    """The bundled stories260K.gguf (llama2.c's converter, not ours) through the same protocol."""
    record = llamacpp.perplexity(str(DEMO / "stories260K.gguf"),
                                 PerplexityOptions.build({"eval": True, "eval_seqlen": 64, "max_windows": 3}),
                                 llamacpp.RuntimeOptions(runtime="llamacpp"))
    assert record["windows"] == 3 and math.isfinite(record["perplexity"]) and record["perplexity"] > 1


def test_speed_times_two_gguf_files_in_interleaved_rounds(files, tmp_path):
    out = tmp_path / "speed.json"
    res = runner.invoke(app, ["speed", "--model", str(files["Q4_0"]), "--baseline", str(files["F32"]),
                              "--runtime", "llamacpp", "--prefill", "32", "--decode", "8", "--repeats", "2",
                              "--llamacpp-threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["runtime"] == "llamacpp" and result["threads"] == 1 and result["rounds"] == 2
    for key in ("dense", "pruned"):
        assert result[key]["prefill_tok_s"] > 0 and result[key]["decode_tok_s"] > 0
    assert result["prefill_ratio"] > 0 and len(result["decode_ratio_spread"]) == 2


def test_what_llamacpp_cannot_load_is_one_line_with_its_reason(tmp_path, lib):
    broken = tmp_path / "broken.gguf"
    data = (DEMO / "stories260K.gguf").read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # header intact, tensor data cut short
    line = one_line(runner.invoke(app, ["eval", "--model", str(broken), "--runtime", "llamacpp", "--seqlen", "64"]))
    assert str(broken) in line
    line = one_line(runner.invoke(app, ["eval", "--model", "demo", "--runtime", "llamacpp"]))
    assert "runs a .gguf file" in line



@pytest.mark.smollm2
def test_a_byte_level_bpe_vocabulary_is_written_as_gpt2_and_tokenizes_as_transformers(smollm2_gguf, tmp_path, lib):
    """SmolLM2's GPT-2-style vocabulary: written as SentencePiece it loaded, and llama.cpp aborted the process on the
    first tokenization (byte_to_token: no <0xXX> pieces); as gpt2 with its merges it tokenizes as transformers does."""
    loaded = loading.load(str(smollm2_gguf))
    path = tmp_path / "s.gguf"
    write_model_gguf(path, loaded.model, loaded.tokenizer, qtype="F16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    text = VALID.read_text()[:3000]
    llm = _llama(path)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)
    finally:
        llm.close()
    assert ids == loaded.tokenizer(text).input_ids
