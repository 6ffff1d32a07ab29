"""``taylorprune imatrix`` (issue #37): the file it writes reads back with ``export.imatrix``, has one entry per
decoder linear with that linear's input width, and holds Σx² equal to a plain hook sum over the same windows (to
1e-5), with counts = windows × seqlen; the legacy ``.dat`` holds the same means; a pruned compact folder gets its
own widths; bad input is one line and a non-zero exit; and llama.cpp's quantizer (llama-cpp-python, skipped
without it) takes our imatrix on our F32 GGUF and rounds differently with it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.export import imatrix as im

from .conftest import DEMO, VALID

runner = CliRunner()
N, SEQLEN = 3, 48
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", str(N), "--seqlen", str(SEQLEN)]


def _imatrix(model: str, out, *extra: str):
    res = runner.invoke(app, ["imatrix", "--model", model, *CALIB, "--device", "cpu", "--output", str(out), *extra])
    assert res.exit_code == 0, res.output
    return im.read_imatrix(out)


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def _hook_sums(model: nn.Module, windows: torch.Tensor) -> dict[str, np.ndarray]:
    """{linear path: Σx²} over every window, one plain forward a window: the test's own hooks."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for path, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, nn.Linear):
            def hook(_m, args, _o, path=path):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sums[path] = sums.get(path, 0) + x.pow(2).sum(0)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for row in windows:
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    return {p: s.numpy() for p, s in sums.items()}


def _windows(tokenizer) -> torch.Tensor:
    """Sequential windows as the papers cut them: the text tokenized once, the first N × SEQLEN tokens."""
    ids = tokenizer(VALID.read_text(), return_tensors="pt").input_ids[0]
    return ids[: N * SEQLEN].view(N, SEQLEN)


def _check_against_hooks(mat: im.Imatrix, folder) -> None:
    model, tokenizer = _load(folder)
    want = _hook_sums(model, _windows(tokenizer))
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.startswith("model.layers.")}
    assert set(mat.sums) == {im.to_gguf(p) for p in linears}
    for path, module in linears.items():
        name = im.to_gguf(path)
        assert mat.sums[name].shape == (module.in_features,) and mat.counts[name] == N * SEQLEN
        np.testing.assert_allclose(mat.sums[name], want[path], rtol=1e-5, atol=0)


def test_the_command_writes_sums_of_squares_a_hook_gives_and_counts_tokens(tmp_path):
    mat = _imatrix("demo", tmp_path / "imatrix.gguf")
    assert not mat.legacy and (mat.chunk_count, mat.chunk_size) == (N, SEQLEN) and mat.datasets == [str(VALID)]
    assert len(mat.sums) == 5 * 7
    _check_against_hooks(mat, DEMO)
    fields = gguf.GGUFReader(str(tmp_path / "imatrix.gguf")).fields  # what llama-quantize insists on
    assert fields["general.type"].contents() == "imatrix" and "imatrix.chunk_size" in fields
    assert not list(tmp_path.glob(".*tmp*"))


def test_the_legacy_dat_holds_the_same_means(tmp_path):
    gguf_mat = _imatrix("demo", tmp_path / "a.gguf")
    dat = _imatrix("demo", tmp_path / "a.dat")
    assert dat.legacy and dat.chunk_count == N and dat.datasets == [str(VALID)] and set(dat.counts.values()) == {N}
    ours, legacy = gguf_mat.mean_sq(), dat.mean_sq()
    assert set(ours) == set(legacy)
    for name, values in ours.items():
        np.testing.assert_allclose(legacy[name], values, rtol=1e-6)


@pytest.mark.slow
def test_a_compact_pruned_folder_gets_its_own_widths(tmp_path):
    res = runner.invoke(app, ["run", "--model", "demo", "--structure", "neurons", "--structure-ratio", "0.25",
                              "--method", "wanda", *CALIB, "--output", str(tmp_path / "compact")])
    assert res.exit_code == 0, res.output
    mat = _imatrix(str(tmp_path / "compact"), tmp_path / "imatrix.gguf")
    assert mat.sums["blk.0.ffn_down.weight"].size < 172  # the pruned intermediate width, not the dense one
    _check_against_hooks(mat, tmp_path / "compact")


@pytest.mark.parametrize("args, says", [
    (["--model", "/nonexistent/model"], "no such folder or file"),
    (["--output", "{tmp}/imatrix.txt"], "ends in .gguf (current format) or .dat"),
    (["--output", "{tmp}/exists.gguf"], "already exists; pass --overwrite"),
    (["--calib", "generated"], "taylorprune generate"),
    (["--nsamples", "0"], "--nsamples"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, says):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv = {"--model": "demo", "--output": str(tmp_path / "out.gguf"), **given}
    res = runner.invoke(app, ["imatrix", *[x.replace("{tmp}", str(tmp_path)) for kv in argv.items() for x in kv]])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code != 0 and len(errors) == 1 and says in errors[0] and "Traceback" not in res.output, res.output
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep" and not (tmp_path / "out.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]


def test_llama_cpp_quantizes_our_f32_gguf_with_our_imatrix(tmp_path):
    pytest.importorskip("llama_cpp")
    from taylorprune.export.llamacpp_quantize import quantize

    res = runner.invoke(app, ["export", "--model", "demo", "--format", "gguf", "--gguf-type", "F32",
                              "--output", str(tmp_path / "f32")])
    assert res.exit_code == 0, res.output
    mat = _imatrix("demo", tmp_path / "imatrix.gguf")
    source = tmp_path / "f32" / "model.gguf"
    # Q4_K_M: stories260K's widths (64, 172) are no multiple of 256 and 172 none of 32, so llama.cpp falls back to
    # Q5_0 (imatrix-weighted), Q8_0 and F16 per tensor; Q4_0 itself refuses the 172 columns of ffn_down.
    quantize(source, tmp_path / "plain.gguf", "Q4_K_M")
    quantize(source, tmp_path / "weighted.gguf", "Q4_K_M", imatrix=tmp_path / "imatrix.gguf")
    plain = gguf.GGUFReader(str(tmp_path / "plain.gguf"))
    weighted = gguf.GGUFReader(str(tmp_path / "weighted.gguf"))
    assert weighted.fields["quantize.imatrix.entries_count"].contents() == len(mat.sums) == 35
    assert weighted.fields["quantize.imatrix.chunks_count"].contents() == N
    assert "quantize.imatrix.file" not in plain.fields
    a = {t.name: (t.tensor_type, np.array(t.data)) for t in plain.tensors}
    b = {t.name: (t.tensor_type, np.array(t.data)) for t in weighted.tensors}
    assert a["blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.Q5_0
    assert not np.array_equal(a["blk.0.attn_q.weight"][1], b["blk.0.attn_q.weight"][1])  # weighed by our imatrix
    assert np.array_equal(a["blk.0.ffn_down.weight"][1], b["blk.0.ffn_down.weight"][1])  # F16: nothing to weigh
    assert np.array_equal(a["token_embd.weight"][1], b["token_embd.weight"][1])  # no imatrix entry for it
