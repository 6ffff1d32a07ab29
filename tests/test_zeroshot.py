"""Zero-shot accuracy through lm-eval, for real and offline, on stories260K with local tasks made here; the
accuracy equals an independent computation (summed log-likelihood of each choice, argmax) on the same examples."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from taylorprune.cli import app
from taylorprune.modeling import loading

from .conftest import DEMO, VALID

pytest.importorskip("lm_eval")
runner = CliRunner()
CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64"]

STORIES = [("Lily went to the park with her mom. She saw a big", ["dog", "spoon", "cloud"], 0),
           ("Tom was hungry. He wanted to eat an", ["apple", "car", "house"], 0),
           ("The sun was hot, so they went to the", ["beach", "moon", "shoe"], 0),
           ("Sam had a red ball. He liked to play with his", ["ball", "soup", "tree"], 0),
           ("The cat was sleepy. It went to", ["sleep", "school", "work"], 0),
           ("Once upon a time, there was a little", ["girl", "table", "rain"], 0),
           ("Mom said, \"Let's bake a", ["cake", "rock", "bus"], 0),
           ("The bird flew up into the", ["sky", "box", "bed"], 0),
           ("Ben cried because he lost his", ["toy", "sun", "river"], 2),
           ("At night, the stars were", ["bright", "green", "loud"], 1)]
LAST_WORDS = ["Lily and Ben went to the park to play on the swings",
              "Once upon a time, there was a little girl named Lily",
              "The dog ran fast after the ball in the park",
              "Tom was very happy because he got a new toy",
              "They played all day and then went home to sleep",
              "Mom gave Sue a big hug and said she loved her"]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a loglikelihood task, as task YAMLs over local jsonl files."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = folder / "stories_mc.jsonl"
    mc.write_text("".join(json.dumps({"q": q, "choices": c, "gold": g}) + "\n" for q, c, g in STORIES))
    (folder / "stories_mc.yaml").write_text(f"""task: stories_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    lw = folder / "stories_last.jsonl"
    lw.write_text("".join(json.dumps({"text": t}) + "\n" for t in LAST_WORDS))
    (folder / "stories_last.yaml").write_text(f"""task: stories_last
dataset_path: json
dataset_kwargs:
  data_files:
    test: {lw}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


@torch.no_grad()
def continuation(model, tokenizer, context: str, ending: str) -> tuple[float, bool]:
    """(summed log-likelihood of ``ending`` after ``context``, whether it is the greedy continuation)."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + ending)
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].float(), -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def evaluated(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "e.json"
    res = runner.invoke(app, ["eval", "--model", str(DEMO), "--no-perplexity", *args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_multiple_choice_and_loglikelihood_accuracy_equal_a_direct_computation(tasks, tmp_path):
    got = evaluated(["--tasks", "stories_mc,stories_last", "--tasks-path", str(tasks)], tmp_path)
    record = got["evaluation"]["zeroshot"]
    demo = loading.load(str(DEMO))
    picks = [max(range(len(c)), key=lambda k, q=q, c=c: continuation(demo.model, demo.tokenizer, q, " " + c[k])[0])
             for q, c, _ in STORIES]
    mc = sum(p == g for p, (_, _, g) in zip(picks, STORIES, strict=True)) / len(STORIES)
    last = sum(continuation(demo.model, demo.tokenizer, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1])[1]
               for t in LAST_WORDS) / len(LAST_WORDS)
    assert record["tasks"]["stories_mc"] == {**record["tasks"]["stories_mc"], "metric": "acc", "examples": 10}
    assert record["tasks"]["stories_mc"]["value"] == pytest.approx(mc)
    assert record["tasks"]["stories_last"]["value"] == pytest.approx(last)
    assert 0 < mc < 1  # the test can tell a right from a wrong computation
    assert got["metrics"]["zeroshot.stories_mc"] == pytest.approx(mc)
    assert got["metrics"]["zeroshot_average"] == pytest.approx((mc + last) / 2)
    assert record["lm_eval"] and record["task_list"] == "stories_mc:acc,stories_last:acc"


@pytest.mark.slow
def test_run_reports_accuracy_and_check_gates_on_a_drop(tasks, tmp_path):
    common = ["--tasks", "stories_mc", "--tasks-path", str(tasks)]
    res = runner.invoke(app, ["run", "--model", "demo", "--method", "magnitude", "--sparsity", "0.7",
                              "--output", str(tmp_path / "o"), *common])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "taylorprune_report.json").read_text())
    pruned = report["metrics"]["zeroshot.stories_mc"]
    dense = evaluated(common, tmp_path)
    assert dense["metrics"]["zeroshot.stories_mc"] > pruned  # 70% magnitude pruning costs accuracy here
    drop = dense["metrics"]["zeroshot.stories_mc"] - pruned
    check = ["check", "--baseline", str(tmp_path / "e.json"), "--candidate", str(tmp_path / "o")]
    strict = runner.invoke(app, [*check[:-1], str(tmp_path / "o" / "taylorprune_report.json"),
                                 "--max-drop", f"zeroshot.stories_mc={drop / 2:.4f}"])
    assert strict.exit_code == 1 and "zeroshot.stories_mc_drop" in strict.output, strict.output
    loose = runner.invoke(app, [*check[:-1], str(tmp_path / "o" / "taylorprune_report.json"),
                                "--max-drop", f"zeroshot_average={drop + 0.01:.4f}"])
    assert loose.exit_code == 0, loose.output


def test_the_bundled_task_runs_offline(tmp_path):
    got = evaluated(["--tasks", "wikitext_lastword", "--limit", "8"], tmp_path)
    task = got["evaluation"]["zeroshot"]["tasks"]["wikitext_lastword"]
    assert task["examples"] == 8 and task["metric"] == "acc" and 0 <= task["value"] <= 1


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "no_such_task_anywhere"], "knows no such task"),
    (["--tasks", "stories_mc:f1"], "reports no f1"),
    (["--tasks", ","], "name at least one task"),
    (["--tasks", "stories_mc", "--tasks-path", "/nonexistent"], "no such folder"),
])
def test_bad_tasks_are_one_line_errors(tasks, args, needle):
    if "--tasks-path" not in args:
        args = [*args, "--tasks-path", str(tasks)]
    res = runner.invoke(app, ["eval", "--model", "demo", "--no-perplexity", *args])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output


def test_without_lm_eval_tasks_say_what_to_install(monkeypatch, tmp_path):
    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    res = runner.invoke(app, ["run", "--model", "demo", "--sparsity", "0.5", *CALIB, "--tasks", "boolq",
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and 'pip install "taylorprune[eval]"' in res.output and not (tmp_path / "o").exists()
