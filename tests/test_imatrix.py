"""llama.cpp importance matrices (issue #37): ours written in the GGUF format current llama.cpp reads (with the
metadata llama-quantize insists on), read back equal; a hand-made legacy .dat read too; names mapped to llama.cpp's
and back; a file of another model is a one-line error; and ``--imatrix FILE`` weighs the GGUF writer's rounding."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.export import imatrix as im
from taylorprune.export.gguf_writer import hf_name

from .conftest import DEMO, VALID


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()


def _columns(model) -> dict[str, int]:
    return {k: v.shape[-1] for k, v in model.state_dict().items() if v.ndim == 2}


def test_names_map_to_llama_cpp_and_back():
    pairs = {"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight",
             "model.layers.3.self_attn.o_proj": "blk.3.attn_output.weight",
             "model.layers.12.mlp.down_proj.weight": "blk.12.ffn_down.weight", "lm_head": "output.weight"}
    for hf, name in pairs.items():
        assert im.to_gguf(hf) == name
        assert hf_name(name) == (hf if hf.endswith(".weight") else f"{hf}.weight")


def test_collect_sums_squares_per_column_and_counts_tokens(stories):
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    mat = im.collect(stories, ids, datasets=["wiki.txt"])
    assert len(mat.sums) == 5 * 7 and "output.weight" not in mat.sums  # llama-imatrix skips output by default
    assert set(mat.counts.values()) == {60} and (mat.chunk_size, mat.chunk_count) == (20, 3)
    q, k, v = (mat.sums[f"blk.1.attn_{t}.weight"] for t in "qkv")
    np.testing.assert_array_equal(q, k)  # one input, one statistic
    np.testing.assert_array_equal(q, v)
    seen = []
    hook = stories.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        stories(ids)
    hook.remove()
    want = seen[0].reshape(-1, seen[0].shape[-1]).pow(2).sum(0).numpy()
    np.testing.assert_allclose(mat.sums["blk.2.ffn_down.weight"], want, rtol=1e-5)
    assert mat.sums["blk.2.ffn_down.weight"].shape == (172,)


def test_the_runs_act_norm_sq_statistics_are_the_same_imatrix(stories):
    from taylorprune.stats.hooks import ActNormSq

    ids = torch.randint(3, 512, (3, 16), generator=torch.Generator().manual_seed(3))
    linear = stories.model.layers[1].mlp.up_proj
    acc = ActNormSq(linear)
    hook = linear.register_forward_hook(lambda m, a, o: acc.add(a[0]))
    with torch.no_grad():
        for row in ids:
            stories(row[None])
    hook.remove()
    ours = im.Imatrix.from_act_norm_sq({"model.layers.1.mlp.up_proj": {"act_norm_sq": acc.result()}}, nseq=3,
                                       seqlen=16)
    direct = im.collect(stories, ids)
    assert ours.counts == {"blk.1.ffn_up.weight": 48} and ours.chunk_count == 3
    np.testing.assert_allclose(ours.sums["blk.1.ffn_up.weight"], direct.sums["blk.1.ffn_up.weight"], rtol=1e-5)


def test_gguf_imatrix_round_trip_and_what_llama_quantize_requires(tmp_path, stories):
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    mat = im.collect(stories, ids, datasets=["calib.txt"], with_output=True)
    path = im.write_imatrix(tmp_path / "imatrix.gguf", mat)
    back = im.read_imatrix(path)
    assert not back.legacy and back.datasets == ["calib.txt"] and (back.chunk_size, back.chunk_count) == (32, 2)
    assert set(back.sums) == set(mat.sums) and back.counts == mat.counts
    for name, s in mat.sums.items():
        np.testing.assert_array_equal(back.sums[name], s)
    # common/imatrix-loader: the three metadata keys (else "missing imatrix metadata"), F32 sums and counts
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "imatrix" and "general.architecture" not in reader.fields
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        assert key in reader.fields
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["blk.0.ffn_down.weight.in_sum2"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [172, 1]
    assert list(tensors["blk.0.ffn_down.weight.counts"].shape) == [1, 1]
    assert float(tensors["output.weight.counts"].data[0, 0]) == 64
    imp = im.importance_for(path, _columns(stories))
    np.testing.assert_array_equal(imp["lm_head.weight"], mat.sums["output.weight"] / np.float32(64))


def _legacy(path, entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> None:
    """A legacy .dat by hand: count; (name length, name, ncall, nval, values = mean x² · ncall)...; trailer."""
    blob = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        blob += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        blob += values.astype("<f4").tobytes()
    blob += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(blob)


def test_a_hand_made_legacy_dat_is_read(tmp_path, stories):
    rng = np.random.default_rng(0)
    mean = {n: rng.random(c).astype(np.float32) + 0.1 for n, c in
            (("blk.0.attn_q.weight", 64), ("blk.4.ffn_down.weight", 172))}
    _legacy(tmp_path / "imatrix.dat", {n: (10, m * np.float32(10)) for n, m in mean.items()}, 10, "wiki.train.raw")
    mat = im.read_imatrix(tmp_path / "imatrix.dat")
    assert mat.legacy and mat.chunk_count == 10 and mat.datasets == ["wiki.train.raw"] and mat.counts == {
        "blk.0.attn_q.weight": 10, "blk.4.ffn_down.weight": 10}
    imp = im.importance_for(mat, _columns(stories))
    assert set(imp) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.4.mlp.down_proj.weight"}
    np.testing.assert_allclose(imp["model.layers.4.mlp.down_proj.weight"], mean["blk.4.ffn_down.weight"], rtol=1e-6)


def test_a_file_of_another_model_is_a_one_line_error(tmp_path, stories):
    wide = im.Imatrix.from_hf({"model.layers.0.self_attn.q_proj": np.ones(256)},
                              {"model.layers.0.self_attn.q_proj": 64}, chunk_size=64)
    im.write_imatrix(tmp_path / "other.gguf", wide)
    with pytest.raises(ValueError, match="of another model: blk.0.attn_q.weight has 256 columns") as err:
        im.importance_for(tmp_path / "other.gguf", _columns(stories))
    assert "\n" not in str(err.value)
    deep = im.Imatrix.from_hf({"model.layers.9.mlp.up_proj": np.ones(64)}, {"model.layers.9.mlp.up_proj": 8},
                              chunk_size=8)
    with pytest.raises(ValueError, match="blk.9.ffn_up.weight is no tensor of this one"):
        im.importance_for(deep, _columns(stories))
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00\x00\x00\xff\xff")
    with pytest.raises(ValueError, match="not an imatrix file"):
        im.read_imatrix(tmp_path / "junk.dat")


RUN = ["run", "--model", "demo", "--method", "wanda", "--sparsity", "0.5", "--calib-file", str(VALID),
       "--nsamples", "4", "--seqlen", "64", "--format", "gguf", "--gguf-type", "Q4_K_M"]


@pytest.mark.slow
def test_the_run_weighs_its_gguf_rounding_with_an_imatrix(tmp_path, stories):
    ids = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    im.write_imatrix(tmp_path / "imatrix.gguf", im.collect(stories, ids))
    plain = CliRunner().invoke(app, [*RUN, "--output", str(tmp_path / "plain")])
    weighted = CliRunner().invoke(app, [*RUN, "--imatrix", str(tmp_path / "imatrix.gguf"),
                                        "--output", str(tmp_path / "weighted")])
    assert plain.exit_code == 0 and weighted.exit_code == 0, weighted.output
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "plain" / "model.gguf")).tensors}
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "weighted" / "model.gguf")).tensors}
    assert not np.array_equal(a["blk.0.attn_q.weight"], b["blk.0.attn_q.weight"])  # Q5_0 fallback, weighted
    assert np.array_equal(a["blk.0.ffn_down.weight"], b["blk.0.ffn_down.weight"])  # F16: nothing to weigh


@pytest.mark.parametrize("args, says", [
    (["--imatrix", "/nonexistent/imatrix.gguf"], "No such file"),
    (["--imatrix", str(VALID)], "not an imatrix file"),
])
def test_an_unusable_imatrix_is_refused_before_any_work(tmp_path, args, says):
    result = CliRunner().invoke(app, [*RUN, *args, "--output", str(tmp_path / "out")])
    assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
