"""Recovery by distillation: masks and N:M patterns exactly kept (LoRA merged too), the held-out KL falls, a seed
repeats, ``recover`` on a run's output equals ``run --recover``, and bad requests are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from taylorprune import pipeline
from taylorprune.cli import app
from taylorprune.errors import UserError
from taylorprune.prune.fit import batches
from taylorprune.prune.masks import check_nm
from taylorprune.recover import head_kl as chunks
from taylorprune.recover.distill import kl_loss, schedule
from taylorprune.recover.head_kl import Targets, head_kl, head_matches, lm_head
from taylorprune.recover.teacher import TargetCache, resident

from .conftest import VALID

runner = CliRunner()
CALIB = dict(calib_file=str(VALID), calib_sampling="sequential", nsamples=4, seqlen=64)
QUICK = {"recover_steps": 12, "recover_windows": 12, "recover_heldout": 2, "recover_batch": 2,
         "recover_eval_every": 4, "recover_lr": 1e-3}
CLI_CALIB = ["--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples", "4", "--seqlen", "64"]
CLI_QUICK = ["--recover-steps", "12", "--recover-windows", "12", "--recover-heldout", "2", "--recover-batch", "2",
             "--recover-eval-every", "4", "--recover-lr", "1e-3"]


def recovered(model, tmp_path, name="o", **kw):
    quick = {**QUICK, **kw.pop("method_options", {})}
    opts = pipeline.RunOptions(model=str(model), output=str(tmp_path / name), recover="distill", **CALIB, **kw,
                               method_options=quick)
    return pipeline.prune(opts)


def masks(state) -> dict[str, torch.Tensor]:
    return {t.path: t.module.weight.detach() != 0 for t in state.layout.all_targets}


@pytest.mark.parametrize("kw", [
    dict(method="wanda", sparsity=0.5),
    dict(method="sparsegpt", pattern="2:4"),
    dict(method="wanda", structure="neurons", pattern="2:4", method_options={"structure_ratio": 0.25}),
    dict(method="wanda", sparsity=0.5, method_options={"recover_weights": "lora", "recover_lora_rank": 4}),
], ids=["unstructured", "2:4", "neurons then 2:4", "lora merged"])
def test_masks_and_patterns_are_kept_exactly(stories_dir, tmp_path, kw):
    without = pipeline.prune(pipeline.RunOptions(model=str(stories_dir), output=str(tmp_path / "p"), **CALIB,
                                                 **{k: v for k, v in kw.items() if k != "method_options"},
                                                 method_options={k: v for k, v in kw.get("method_options", {}).items()
                                                                 if not k.startswith("recover")}))
    state = recovered(stories_dir, tmp_path, **kw)
    before, after = masks(without), masks(state)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the very same mask, zero for zero
    changed = [k for k in before if not torch.equal(without.model.get_submodule(k).weight,
                                                     state.model.get_submodule(k).weight)]
    assert len(changed) == len(before)  # and every linear was trained
    if kw.get("pattern") == "2:4":
        assert all(check_nm(state.model.get_submodule(k).weight, 2, 4) for k in after)
    record = state.records["recover"]
    assert record["kl_after"] < record["kl_before"] and record["steps"] >= 4
    curve = record["kl_curve"]  # every held-out evaluation, from step 0 to the last step run
    assert curve[0] == [0, round(record["kl_before"], 6)] and curve[-1][0] == record["steps"]
    assert min(kl for _, kl in curve) == round(record["kl_after"], 6)
    assert record["tokens_seen"] == record["steps"] * 2 * 64 and record["teacher_placement"] == "resident"
    cache = record["teacher_cache"]  # 10 training windows, 2 a step: later steps revisit them
    assert cache["windows"] <= 10 and cache["hits"] == record["steps"] * 2 - cache["windows"] > 0
    assert record["loss"] == "chunked"  # from the final hidden states, LoRA-wrapped too (head_kl)
    if "structure" in kw:
        assert state.model.config.intermediate_size < without.model.config.intermediate_size + 1  # still compact
    if kw.get("method_options", {}).get("recover_weights") == "lora":
        assert "kl_after_merged" in record and not any("lora" in n for n, _ in state.model.named_parameters())


def test_same_seed_gives_identical_weights(stories_dir, tmp_path):
    a = recovered(stories_dir, tmp_path, method="magnitude", sparsity=0.5)
    b = recovered(stories_dir, tmp_path, method="magnitude", sparsity=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                 strict=True))
    c = recovered(stories_dir, tmp_path, method="magnitude", sparsity=0.5, seed=1)
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values(),
                                                     strict=True))


@pytest.mark.slow
def test_recover_command_on_a_run_output_equals_run_recover(stories_dir, tmp_path):
    common = ["--method", "wanda", "--sparsity", "0.5", *CLI_CALIB]
    assert runner.invoke(app, ["run", "--model", str(stories_dir), *common, "--recover", "distill", *CLI_QUICK,
                               "--output", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(app, ["run", "--model", str(stories_dir), *common, "--output", str(tmp_path / "p")]
                         ).exit_code == 0
    res = runner.invoke(app, ["recover", "--model", str(tmp_path / "p"), "--teacher", str(stories_dir), *CLI_CALIB,
                              *CLI_QUICK, "--output", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    report = json.loads((tmp_path / "b" / "taylorprune_report.json").read_text())
    assert report["recover"]["teacher"] == str(stories_dir) and report["achieved_sparsity"] is None


def test_the_hidden_state_term_trains_toward_the_teacher_too(stories_dir, tmp_path):
    record = recovered(stories_dir, tmp_path, method="wanda", sparsity=0.5,
                       method_options={"recover_hidden": 1.0}).records["recover"]
    assert record["kl_after"] < record["kl_before"]  # KL + MSE of the last hidden states, both held out
    assert record["teacher_cache"] is None and record["loss"] == "chunked"  # the whole teacher runs each batch


def test_kl_and_schedule():
    logits = torch.randn(2, 5, 11)
    assert kl_loss(logits, logits, 1.0).abs() < 1e-6 and kl_loss(logits, 2 * logits, 2.0) > 0
    factor = schedule(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0) and factor(99) == pytest.approx(0.1,
                                                                                                                abs=0.01)


@pytest.mark.parametrize("extra,needle", [
    (["--recover-steps", "5"], "does not apply"),  # an option of a stage that is off
    (["--recover", "distill", "--recover-steps", "0"], "at least 1"),
    (["--recover", "distill", "--recover-weights", "half"], "choose one of all, lora"),
    (["--recover", "magic"], "choose one of none, distill"),
    (["--recover", "distill", "--recover-teacher", "/nonexistent"], "no such folder"),
])
def test_bad_recovery_requests_are_one_line_errors(tmp_path, extra, needle):
    res = runner.invoke(app, ["run", "--model", "demo", "--sparsity", "0.5", *CLI_CALIB, "--output",
                              str(tmp_path / "o"), *extra])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_text_too_short_for_the_recovery_windows_fails_before_pruning(tmp_path, monkeypatch):
    from taylorprune.pipeline.phases import unstructured

    monkeypatch.setattr(unstructured, "prune_layers", lambda *a, **k: pytest.fail("pruned before the check"))
    res = runner.invoke(app, ["run", "--model", "demo", "--sparsity", "0.5", *CLI_CALIB, "--recover", "distill",
                              "--recover-windows", "500000", "--output", str(tmp_path / "o")])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "--recover-windows" in errors[0], res.output
    assert not (tmp_path / "o").exists()


def test_a_teacher_with_another_vocabulary_is_refused(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "other"
    config = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    res = runner.invoke(app, ["run", "--model", str(tiny_dirs["llama"]), "--sparsity", "0.5", *CLI_CALIB,
                              "--recover", "distill", "--recover-teacher", str(other), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "vocabulary (600)" in res.output, res.output


def test_a_training_set_that_cannot_fit_the_device_says_what_lowers_it(stories_dir, tmp_path, monkeypatch):
    from taylorprune.pipeline.phases import recover

    monkeypatch.setattr(recover, "device_budget", lambda device, cap=None: 2**20)  # 1 MiB of "device"
    with pytest.raises(UserError, match="--recover-weights lora"):
        recovered(stories_dir, tmp_path, method="wanda", sparsity=0.5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cached_teacher_targets_are_the_teachers_logits(tiny_dirs, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).eval()
    teacher = resident(model, hidden=False)
    ids = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    cache = TargetCache(teacher, windows=3, window_bytes=16 * 32 * 4, hidden=False)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        first = cache(ids[:2], [0, 1])[0].logits()
        again = cache(ids[[1, 2]], [1, 2])[0].logits()  # window 1 from its kept states, window 2 new
    assert cache.record() == {"windows": 3, "hits": 1}
    assert torch.allclose(first, whole[:2], atol=1e-5) and torch.allclose(again, whole[1:], atol=1e-5)


def test_a_cache_whose_head_is_not_the_models_switches_itself_off(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    teacher = resident(model, hidden=False)
    teacher.head = lambda states: 30 * torch.tanh(model.lm_head(states) / 30) * 2  # an architecture it cannot see
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    cache = TargetCache(teacher, windows=2, window_bytes=16 * 32 * 4, hidden=False)
    with torch.no_grad():
        assert torch.equal(cache(ids, [0, 1])[0].logits(), model(input_ids=ids).logits)
    assert cache.record() is None and not cache.store
    too_big = TargetCache(resident(model, hidden=False), windows=2, window_bytes=2**40, hidden=False)
    assert too_big.record() is None


@pytest.mark.parametrize("arch,cap,temperature", [("llama", None, 1.0), ("gemma3", 3.0, 2.0)])
def test_the_chunked_loss_equals_the_plain_one_in_value_and_gradient(tiny_dirs, monkeypatch, arch, cap,
                                                                     temperature):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).eval()
    model.config.final_logit_softcapping = cap
    monkeypatch.setattr(chunks, "CHUNK", 7)  # chunks that straddle windows, and a short last one
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 16), generator=gen)
    assert head_matches(model, ids)
    targets = Targets(torch.randn(2, 16, 32, generator=gen), lm_head(model))  # a teacher's final states
    states = model.get_decoder()(input_ids=ids).last_hidden_state.detach().requires_grad_()
    plain = kl_loss(lm_head(model)(states), targets.logits(), temperature)
    (want,) = torch.autograd.grad(3 * plain, states)
    got = head_kl(states, lm_head(model), targets, temperature)
    (grad,) = torch.autograd.grad(3 * got, states)
    assert plain > 0.01 and torch.allclose(got, plain, rtol=1e-5)
    assert torch.allclose(grad, want, rtol=1e-4, atol=1e-7)


def test_a_head_that_is_not_the_models_is_seen(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    assert head_matches(model, ids)
    model.config.final_logit_softcapping = 1.0  # lm_head would cap; LLaMA's forward does not
    assert not head_matches(model, ids)


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**16))
def test_epoch_batches_see_every_window_once_a_pass(size, batch, passes, seed):
    draws = batches(size, batch, torch.Generator().manual_seed(seed), epochs=True)
    drawn = [next(draws) for _ in range(-(-size * passes // batch))]
    assert all(len(b) == batch for b in drawn)
    seen = torch.cat(drawn)
    for k in range(passes):  # each pass, in order, is a permutation of the windows
        assert sorted(seen[k * size:(k + 1) * size].tolist()) == list(range(size))
    assert torch.equal(next(batches(size, batch, torch.Generator().manual_seed(seed), epochs=True)), drawn[0])
    fresh = next(batches(size, batch, torch.Generator().manual_seed(seed), epochs=False))  # random: one draw
    assert len(set(fresh.tolist())) == len(fresh) == min(batch, size)
