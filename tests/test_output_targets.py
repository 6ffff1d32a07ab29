"""Output files named on the command line are checked before any work: a target that cannot be written fails as
one line (exit 2, no traceback) before a table is printed or a model is loaded or pruned."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.export import targets

from .conftest import DEMO, VALID

runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def only_error(res) -> str:
    """The whole output of a refused command: one line, ``error: ...``, exit 2, nothing printed before it."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@pytest.fixture
def blocker(tmp_path):
    """A file: a path under it can never be written, whoever runs the test (root included)."""
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


def test_inspect_refuses_a_folder_as_its_json_before_any_table(tmp_path):
    line = only_error(invoke("inspect", DEMO, "--json", tmp_path))
    assert line == f"error: --json {tmp_path}: is a folder; give a file path"


def test_inspect_refuses_a_json_under_a_file_before_any_table(blocker):
    line = only_error(invoke("inspect", DEMO, "--json", blocker / "sub" / "i.json"))
    assert f"{blocker} is not a writable folder" in line


def test_inspect_makes_a_missing_parent_folder(tmp_path):
    res = invoke("inspect", DEMO, "--json", tmp_path / "new" / "deeper" / "i.json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "new" / "deeper" / "i.json").is_file()


def test_check_refuses_its_outputs_before_evaluating_anything(tmp_path, blocker):
    model = ["--candidate", DEMO, "--max-ppl", "1e9", "--seqlen", "32", "--max-windows", "1"]
    assert "--json" in only_error(invoke("check", *model, "--json", tmp_path))
    assert "--junit" in only_error(invoke("check", *model, "--junit", blocker / "j.xml"))
    line = only_error(invoke("check", *model, "--json", tmp_path / "v.out", "--junit", tmp_path / "v.out"))
    assert "the same file as --json" in line
    assert not (tmp_path / "v.out").exists()


def test_check_never_overwrites_its_input(tmp_path):
    result = tmp_path / "r.json"
    result.write_text('{"perplexity": 10.0, "dataset": "wikitext2", "seqlen": 32, "windows": 1, "tokens": 32}')
    line = only_error(invoke("check", "--candidate", result, "--max-ppl", "20", "--json", result))
    assert "is an input of this command" in line
    assert result.read_text().startswith('{"perplexity": 10.0')


def test_run_refuses_save_scores_targets_before_loading(tmp_path, blocker):
    run = ["run", "--model", "demo", "--method", "wanda", "--sparsity", "0.5", *CALIB, "--output", tmp_path / "o"]
    assert "is a folder; give a .safetensors file path" in only_error(invoke(*run, "--save-scores", tmp_path))
    assert "not a writable folder" in only_error(invoke(*run, "--save-scores", blocker / "s.safetensors"))
    assert not (tmp_path / "o").exists()


def test_a_run_may_share_nothing_between_its_output_files(tmp_path):
    same = tmp_path / "x.safetensors"
    res = invoke("run", "--model", "demo", "--method", "gblm", "--sparsity", "0.5", *CALIB, "--output",
                 tmp_path / "o", "--save-scores", same, "--grad-cache", same)
    assert "the same file as --save-scores" in only_error(res)


def test_the_helper_allows_what_can_be_made_and_a_read_only_cache(tmp_path):
    assert targets.check_file(tmp_path / "a" / "b" / "c.json", "--json") == tmp_path / "a" / "b" / "c.json"
    cache = tmp_path / "cache.safetensors"
    cache.write_text("x")
    cache.chmod(0o444)
    try:
        targets.check_file(cache, "--grad-cache", reused=True)
    finally:
        cache.chmod(0o644)
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="inside the input model folder"):
        targets.check_file(tmp_path / "m" / "s.safetensors", "--save-scores", [tmp_path / "m"])


@pytest.mark.parametrize("command", [["eval", "--model", DEMO], ["speed", "--model", DEMO, "--baseline", DEMO]])
def test_eval_and_speed_refuse_a_folder_as_their_json_before_loading(command, tmp_path):
    line = only_error(invoke(*command, "--json", tmp_path))
    assert line == f"error: --json {tmp_path}: is a folder; give a file path"
