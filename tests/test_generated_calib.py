"""Teacher-written calibration text (``--calib generated``) and mixed sources (``--calib-mix``), on stories260K:
seeded and reproducible sampling, the on-disk cache (reused without the model, refused or regenerated for another
model), windows in the mix's proportions, generated text as calibration for a method, ``--recon block`` and
``--recover distill`` (held-out KL per source), ``taylorprune generate``, and bad input as one-line errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.calib import generate, mix
from taylorprune.calib.text import Corpus, read_file
from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.modeling import loading

from .conftest import VALID

runner = CliRunner()
SMALL = dict(sequences=6, length=24, temperature=1.0, top_p=0.9, batch=4, seed=3)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return loading.load(str(stories_dir))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAYLORPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """A spy on the model's sampling: one entry per batch sampled."""
    made: list[int] = []
    real = generate.sample_batch

    def spy(model, first, *args, **kwargs):
        made.append(len(first))
        return real(model, first, *args, **kwargs)

    monkeypatch.setattr(generate, "sample_batch", spy)
    return made


def test_sampling_is_seeded_and_reproducible(stories):
    s = generate.Sampler(**SMALL)
    a = generate.sample_ids(stories.model, stories.tokenizer, s)
    b = generate.sample_ids(stories.model, stories.tokenizer, s)
    assert a.shape == (6, 24) and torch.equal(a, b)
    assert (a[:, 0] == stories.tokenizer.bos_token_id).all()  # BOS, then the model's unconditional first token
    other = generate.sample_ids(stories.model, stories.tokenizer, generate.Sampler(**{**SMALL, "seed": 4}))
    assert not torch.equal(a, other)


def test_prompts_start_the_sequences(stories, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nTom had a dog\n")
    s = generate.Sampler(**SMALL, prompts=generate.read_prompts(str(prompts)))
    ids = generate.sample_ids(stories.model, stories.tokenizer, s)
    texts = generate.decode(stories.tokenizer, ids)
    assert all(t.startswith(p) for t, p in zip(texts, ["Once upon a time", "Tom had a dog"] * 3, strict=True))
    assert ids.shape == (6, 24)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = generate.nucleus(torch.tensor([[2.0, 1.0, 0.0, -5.0]]).log_softmax(-1), 1.0, 0.7)
    assert probs[0, 0] > 0 and probs[0, 1] > 0 and probs[0, 2] == 0 and probs[0, 3] == 0
    assert generate.nucleus(torch.zeros(1, 3), 1.0, 1e-6).count_nonzero() == 1  # the top token always stays


def test_cache_is_reused_without_calling_the_model(stories, cache, calls):
    s = generate.Sampler(**SMALL)
    first, record = generate.generated_corpus(stories.model, stories.tokenizer, s, model_name="demo")
    assert calls and not record["reused"] and record["tokens_per_s"] > 0 and record["fingerprint"]
    calls.clear()
    again, reused = generate.generated_corpus(stories.model, stories.tokenizer, s, model_name="demo")
    assert calls == [] and reused["reused"] and torch.equal(first.ids, again.ids) and first.text == again.text


def test_cache_of_another_model_is_regenerated_or_refused(stories_dir, cache, calls, tmp_path):
    s = generate.Sampler(**SMALL)
    a = loading.load(str(stories_dir))
    explicit = str(tmp_path / "gen.safetensors")
    generate.generated_corpus(a.model, a.tokenizer, s, cache_file=explicit)
    generate.generated_corpus(a.model, a.tokenizer, s)  # the default place, too
    b = loading.load(str(stories_dir))
    with torch.no_grad():
        b.model.model.norm.weight.mul_(1.01)  # another model: same config and names, other weights
    calls.clear()
    _, record = generate.generated_corpus(b.model, b.tokenizer, s)
    assert calls and not record["reused"]  # the default cache: a miss, sampled again
    with pytest.raises(UserError, match="another model"):
        generate.generated_corpus(b.model, b.tokenizer, s, cache_file=explicit)
    with pytest.raises(UserError, match="other settings"):
        generate.generated_corpus(a.model, a.tokenizer, generate.Sampler(**{**SMALL, "seed": 9}), cache_file=explicit)


def test_mix_draws_windows_in_proportion(stories, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"Lily saw {k} birds in the park." for k in range(400)))
    entries = mix.parse(f"wikitext2-valid:0.3,{other}:0.7")
    corpora = [(entries[0], Corpus("wikitext2-valid", text=VALID.read_text())), (entries[1], read_file(other))]
    ids, spec, record = mix.sample(stories.tokenizer, corpora, 20, 32, 5, "random")
    assert ids.shape == (20, 32) and spec.source == mix.describe(entries)
    assert Counter(record["window_sources"]) == {"wikitext2-valid": 6, str(other): 14}
    assert [s["windows"] for s in record["sources"]] == [6, 14]
    again = mix.sample(stories.tokenizer, corpora, 20, 32, 5, "random")
    assert torch.equal(ids, again[0]) and again[2] == record
    birds = {int(t) for t in stories.tokenizer(other.read_text()).input_ids}
    for window, source in zip(ids, record["window_sources"], strict=True):  # each window is from its source
        assert ({int(t) for t in window} <= birds) == (source == str(other))
    assert mix.proportional(10, [1, 1, 1]) == [4, 3, 3] and sum(mix.proportional(7, [0.2, 0.5, 0.3])) == 7


def _opts(stories_dir, tmp_path, **kw):
    base = dict(model=str(stories_dir), output=str(tmp_path / "o"), device="cpu", calib="generated", nsamples=4,
                seqlen=32, calib_sampling="sequential", gen_batch=4)
    return pipeline.RunOptions(**{**base, **kw})


def test_generated_text_calibrates_a_method_and_block_recon(stories_dir, tmp_path, cache):
    state = pipeline.prune(_opts(stories_dir, tmp_path, method="wanda", sparsity=0.5, recon="block",
                                 method_options={"recon_steps": 2}))
    calib = state.records["calibration"]
    assert calib["source"] == "generated" and calib["generated"]["tokens"] == 4 * 32
    assert calib["generated"]["fingerprint"] and calib["generated"]["tokens_per_s"] > 0
    assert state.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    corpus = state.prepared["corpora"][0][1]
    assert torch.equal(state.calib_ids, corpus.ids)  # sequential: each window is one generated sequence
    assert state.records["unstructured"]["recon"]["fits"] == 5  # every block re-fitted on the generated windows


def test_recovery_holds_out_windows_of_every_source(stories_dir, tmp_path, cache):
    quick = {"recover_steps": 4, "recover_heldout": 2, "recover_batch": 2, "recover_eval_every": 2,
             "recover_windows": 8}
    state = pipeline.prune(_opts(stories_dir, tmp_path, calib=None, calib_mix="wikitext2-valid:1,generated:1",
                                 method="wanda", sparsity=0.5, recover="distill", gen_samples=8,
                                 method_options=quick))
    calib, rec = state.records["calibration"], state.records["recover"]
    assert Counter(calib["mix"]["window_sources"]) == {"wikitext2-valid": 2, "generated": 2}
    assert [(s["source"], s["heldout"], s["train"]) for s in rec["sources"]] == [("wikitext2-valid", 1, 3),
                                                                                 ("generated", 1, 3)]
    assert all(s["kl_before"] > 0 and s["kl_after"] >= 0 for s in rec["sources"])
    assert rec["generated"]["sequences"] == 8 and rec["generated"]["reused"] is False


def test_generate_command_writes_the_text_and_reuses_the_cache(tmp_path, cache, calls):
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", "demo", "--output", str(out), "--gen-samples", "4", "--gen-length", "20",
            "--gen-batch", "2", "--seed", "1", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(texts) == 4 and all(texts) and calls == [2, 2]
    calls.clear()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0 and calls == []
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == texts


def test_recover_command_generates_from_the_teacher(stories_dir, tmp_path, cache):
    out = tmp_path / "r"
    res = runner.invoke(app, ["recover", "--model", "demo", "--teacher", str(stories_dir), "--calib", "generated",
                              "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "32", "--gen-samples",
                              "6", "--recover-steps", "2", "--recover-heldout", "2", "--recover-batch", "2",
                              "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "taylorprune_report.json").read_text())["recover"]
    assert record["generated"]["model"] == str(stories_dir) and record["generated"]["sequences"] == 6
    assert record["heldout_windows"] == 2 and record["train_windows"] == 4


@pytest.mark.parametrize("args, message", [
    (["--calib-mix", "wikitext2-valid:0,generated:1"], "weight must be above 0"),
    (["--calib-mix", "wikitext2-valid:-1"], "weight must be above 0"),
    (["--calib-mix", "nonesuch:1"], "unknown source"),
    (["--calib", "nonesuch"], "choose one of"),
    (["--calib", "generated", "--gen-length", "4096"], "at most 2048 positions"),
    (["--calib", "generated", "--gen-top-p", "0"], "--gen-top-p 0"),
    (["--calib", "generated", "--gen-top-p", "1.5"], "--gen-top-p 1.5"),
    (["--calib", "generated", "--gen-temperature", "0"], "--gen-temperature 0"),
    (["--calib", "wikitext2-valid", "--calib-mix", "generated:1"], "keep one"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cache, args, message, monkeypatch):
    monkeypatch.setattr(generate, "sample_ids", lambda *a, **k: pytest.fail("sampled before the check"))
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--model", "demo", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32",
                              *args, "--output", str(out)])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and message in errors[0], res.output
    assert not out.exists() and not (cache / "generated").exists()
