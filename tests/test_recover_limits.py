"""Recovery counts the calibration source cannot give are one-line errors naming the limit, raised before any
pruning or training and with nothing written; the default window count is every window, at most what training
reads plus the held-out ones (``recover.windows``)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.recover.distill import RecoverOptions
from taylorprune.recover.windows import window_count

from .conftest import DEMO, VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64"]


@pytest.fixture(scope="module")
def holds() -> int:
    """Windows of 64 tokens the calibration text holds for stories260K's tokenizer."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(DEMO)(VALID.read_text()).input_ids) // 64


def _no_work(monkeypatch) -> None:
    """Any pruning or training fails the test: the counts must be refused before either starts."""
    from taylorprune.pipeline.phases import recover, unstructured

    monkeypatch.setattr(unstructured, "prune_layers", lambda *a, **k: pytest.fail("pruned before the check"))
    monkeypatch.setattr(recover, "distill", lambda *a, **k: pytest.fail("trained before the check"))


def _refused(args: list[str], out) -> str:
    res = runner.invoke(app, [*args, *CALIB, "--output", str(out)])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    assert not out.exists()
    return errors[0]


COMMANDS = {"run": ["run", "--model", "demo", "--sparsity", "0.5", "--recover", "distill"],
            "recover": ["recover", "--model", "demo", "--teacher", "demo"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_more_heldout_windows_than_the_source_holds_is_refused(command, holds, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    line = _refused([*COMMANDS[command], "--recover-heldout", "100000"], tmp_path / "o")
    assert line.startswith("error: --recover-heldout 100000:"), line
    assert f"holds {holds} windows of 64 tokens" in line and f"hold out at most {holds - 1}" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_more_windows_than_the_source_holds_is_refused_not_clamped(command, holds, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    line = _refused([*COMMANDS[command], "--recover-windows", str(holds + 1)], tmp_path / "o")
    assert line.startswith(f"error: --recover-windows {holds + 1}:"), line
    assert f"holds {holds} windows of 64 tokens" in line, line


def test_heldout_windows_must_leave_one_to_train(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    line = _refused([*COMMANDS["recover"], "--recover-windows", "4", "--recover-heldout", "4"], tmp_path / "o")
    assert "--recover-heldout 4" in line and "hold out at most 3" in line, line


def _options(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**RecoverOptions().as_dict(), **kw})


def test_the_default_is_every_window_up_to_what_training_reads():
    defaults = RecoverOptions()
    assert (defaults.recover_windows, defaults.recover_lr, defaults.recover_steps) == (None, 5e-4, 260)
    assert window_count(534, _options(), 512, "wikitext2-valid") == 534  # SmolLM2: every window, 8 held out
    assert window_count(1308, _options(), 512, "wikitext2-valid") == 260 * 4 + 8  # stories260K: what steps read
    assert window_count(534, _options(recover_windows=100), 512, "t") == 100
    with pytest.raises(UserError, match=re.escape("--recover-windows 535: the calibration text t holds 534")):
        window_count(534, _options(recover_windows=535), 512, "t")
