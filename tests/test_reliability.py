"""Reliability through the CLI: validation before work, clear one-line errors, atomic output, determinism."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from taylorprune.cli import app

from .conftest import DEMO, VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "2", "--seqlen", "32"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def model_copy(tmp_path) -> Path:
    dst = tmp_path / "input"
    shutil.copytree(DEMO, dst)
    return dst


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def expect_user_error(args, needle, code=2):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    assert needle in res.output, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    return res


def run_args(model, out, *extra):
    return ["run", "--model", model, "--method", "wanda", *CALIB, "--output", out, *extra]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--sparsity", "0"], "between 0 and 1"),
        (["--sparsity", "1"], "between 0 and 1"),
        (["--pattern", "2:2"], "0 < N < M"),
        (["--pattern", "two:four"], "N:M"),
        (["--sparsity", "0.3", "--pattern", "2:4"], "implies sparsity 0.5"),
        (["--sparsity", "0.5", "--nsamples", "0"], "--nsamples 0"),
        (["--sparsity", "0.5", "--seqlen", "1"], "--seqlen 1"),
        (["--sparsity", "0.5", "--seqlen", "4096"], "at most 2048"),
        (["--sparsity", "0.5", "--device", "cuda:7"], "CUDA"),
        (["--sparsity", "0.5", "--method", "wandaa"], "registered methods"),
        (["--sparsity", "0.5", "--calib-file", "/nonexistent.txt"], "file not found"),
        (["--sparsity", "0.5", "--grad-norm", "l3", "--method", "gblm"], "--grad-norm"),
        (["--sparsity", "0.5", "--hvp-scope", "layer", "--method", "oba"], "--hvp-scope"),
        (["--sparsity", "0.5", "--oba-normalize", "sum", "--method", "oba"], "--oba-normalize"),
        (["--sparsity", "0.5", "--dtype", "float8"], "--dtype"),
    ],
)
def test_bad_options_fail_before_work(tmp_path, model_copy, extra, needle):
    before = digest(model_copy)
    expect_user_error(run_args(model_copy, tmp_path / "out", *extra), needle)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")
    assert digest(model_copy) == before


def test_missing_model_and_folder_without_config(tmp_path):
    expect_user_error(run_args(tmp_path / "nope", tmp_path / "o", "--sparsity", "0.5"), "no such folder")
    (tmp_path / "empty").mkdir()
    expect_user_error(run_args(tmp_path / "empty", tmp_path / "o", "--sparsity", "0.5"), "no config.json")


def test_config_without_weights_and_pickle_only(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "no *.safetensors")
    torch.save({"x": torch.zeros(1)}, model_copy / "pytorch_model.bin")
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "pickle")


def test_truncated_safetensors(tmp_path, model_copy):
    data = (model_copy / "model.safetensors").read_bytes()
    (model_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "model")
    assert not (tmp_path / "o").exists()


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         vocab_size=30)).save_pretrained(folder)
    expect_user_error(run_args(folder, tmp_path / "o", "--sparsity", "0.5"), "not a decoder-only causal LM")


def test_remote_code_is_refused_without_the_flag(tmp_path, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoConfig": "custom.MyConfig"})
    (model_copy / "config.json").write_text(json.dumps(cfg))
    (model_copy / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    res = expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "config")
    assert "remote code ran" not in res.output


def test_short_texts_are_refused_before_pruning(tmp_path, model_copy):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    args = ["run", "--model", model_copy, "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2", "--seqlen",
            "32", "--output", tmp_path / "o"]
    expect_user_error([*args, "--calib-file", short], "too short")
    expect_user_error([*args, "--calib-file", VALID, "--eval", "--eval-text-file", short, "--eval-seqlen", "64"],
                      "fewer than one window")
    assert not (tmp_path / "o").exists()


def test_output_must_not_overlap_the_input(tmp_path, model_copy):
    before = digest(model_copy)
    expect_user_error(run_args(model_copy, model_copy, "--sparsity", "0.5"), "overlaps the input")
    expect_user_error(run_args(model_copy, model_copy, "--sparsity", "0.5", "--overwrite"), "overlaps the input")
    expect_user_error(run_args(model_copy, model_copy / "sub", "--sparsity", "0.5"), "overlaps the input")
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5", "--save-scores",
                               model_copy / "s.safetensors"), "inside the input")
    assert digest(model_copy) == before


def test_existing_output_needs_overwrite_and_is_replaced_atomically(tmp_path, model_copy):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    expect_user_error(run_args(model_copy, out, "--sparsity", "0.5"), "already exists")
    assert (out / "old.txt").exists()
    res = runner.invoke(app, [str(a) for a in run_args(model_copy, out, "--sparsity", "0.5", "--overwrite")])
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path, "o")


def test_output_parent_must_be_a_folder_and_disk_must_have_room(tmp_path, model_copy, monkeypatch):
    (tmp_path / "file").write_text("x")
    expect_user_error(run_args(model_copy, tmp_path / "file" / "o", "--sparsity", "0.5"), "is a file")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "GiB free")


def test_non_finite_scores_name_the_layer(tmp_path, model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "model.layers.2", code=1)
    assert not (tmp_path / "o").exists()


def test_out_of_memory_names_the_phase(tmp_path, model_copy, monkeypatch):
    import taylorprune.pipeline.phases.unstructured as unstructured

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(unstructured, "prune_layers", boom)
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "while pruning with wanda", code=1)


def test_interrupt_during_save_leaves_nothing(tmp_path, model_copy, monkeypatch):
    import taylorprune.export.save as save

    real = save.save_model

    def interrupted(model, tokenizer, folder):
        real(model, tokenizer, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "save_model", interrupted)
    res = runner.invoke(app, [str(a) for a in run_args(model_copy, tmp_path / "o", "--sparsity", "0.5")])
    assert res.exit_code == 130 and "interrupted" in res.output
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")


def test_failed_verification_leaves_nothing(tmp_path, model_copy, monkeypatch):
    import taylorprune.export.save as save

    real = save.save_model

    def corrupting(model, tokenizer, folder):
        real(model, tokenizer, folder)
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.mlp.up_proj.weight"].fill_(1.0)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(save, "save_model", corrupting)
    expect_user_error(run_args(model_copy, tmp_path / "o", "--sparsity", "0.5"), "verification failed", code=1)
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")


SLOW_SAVE = """
import sys, time
import taylorprune.export.save as s
real = s.save_model
def slow(*a):
    real(*a)
    print("SAVED", flush=True)
    time.sleep(60)
s.save_model = slow
from taylorprune.cli import main
sys.argv = ["taylorprune"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_saving_leaves_no_output(tmp_path, model_copy, sig):
    out = tmp_path / "o"
    cmd = [sys.executable, "-c", SLOW_SAVE, *[str(a) for a in run_args(model_copy, out, "--sparsity", "0.5")]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in proc.stdout:
        if "SAVED" in line or time.time() > deadline:
            break
    assert leftovers(tmp_path, "o"), "the run should be writing into a temporary folder"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not leftovers(tmp_path, "o")


def test_same_command_gives_bit_identical_outputs(tmp_path, model_copy):
    reports, weights = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        res = runner.invoke(app, [str(a) for a in run_args(model_copy, out, "--pattern", "2:4", "--calib-sampling",
                                                              "random", "--seed", "3")])
        assert res.exit_code == 0, res.output
        weights.append((out / "model.safetensors").read_bytes())
        rep = json.loads((out / "taylorprune_report.json").read_text())
        for volatile in ("phases_s", "peak_memory_mib", "wall_s"):
            rep.pop(volatile)
        rep["options"].pop("output")
        reports.append(rep)
    assert weights[0] == weights[1]
    assert reports[0] == reports[1]
