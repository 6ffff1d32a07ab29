"""Blocked causal attention (``modeling.attention``): the function the model's SDPA computes, in blocks of queries
on a CPU, and switched on only for recovery's training (its baseline forward keeps the model's own)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from taylorprune.modeling import attention, loading
from taylorprune.modeling.attention import NAME, blocked, implementation
from taylorprune.recover import pace

from .conftest import tiny_config

CPU = torch.device("cpu")


def _model(arch: str, positions: int = 1024) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.max_position_embeddings = positions
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _logits_and_grads(model, ids):
    params = [p for p in model.model.layers.parameters()]
    logits = model(input_ids=ids, use_cache=False).logits
    grads = torch.autograd.grad(logits.logsumexp(-1).mean(), params)
    return logits.detach(), grads


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # round-off of the softmax sums taken in another order: far below this bound, far above what a bug leaves
    assert (a - b).abs().max() <= 1e-5 * a.abs().max().clamp_min(1e-6)


@pytest.mark.parametrize("length", [300, 512, 1024])
def test_blocked_attention_gives_the_models_own_outputs_and_gradients(length):
    model = _model("llama")  # 4 heads, 2 key/value heads (grouped), head size 8
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    calls = []
    seen = attention.blocked_attention_forward

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return seen(module, query, *args, **kwargs)

    stock, stock_grads = _logits_and_grads(model, ids)
    attention.AttentionInterface.register(NAME, spy)
    try:
        with blocked(model, CPU):
            assert implementation(model) == NAME
            got, got_grads = _logits_and_grads(model, ids)
    finally:
        attention.AttentionInterface.register(NAME, seen)
    assert implementation(model) == "sdpa" and calls == [length] * 3
    _close(stock, got)
    for a, b in zip(stock_grads, got_grads, strict=True):
        _close(a, b)


def test_the_blocks_are_causal_attention_of_their_rows():
    """Against attention written out (scores, causal mask, softmax), with a last block shorter than the rest."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 8) for _ in range(3))
    module = torch.nn.Module()
    out, _ = attention.blocked_attention_forward(module, q, k, v, None, scaling=0.5)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(300, 300, dtype=torch.bool).tril(), -torch.inf)
    _close((scores.softmax(-1) @ v).transpose(1, 2), out)
    moved = attention.blocked_attention_forward(module, q, k, v.roll(1, dims=2), None, scaling=0.5)[0]
    assert (moved - out).abs().max() > 1e-2  # the check sees a wrong value


def test_masks_other_lengths_and_devices_go_to_sdpa_unchanged():
    """A sliding window (a mask), a short window: the stock SDPA function's own outputs, bit for bit."""
    model = _model("mistral")  # sliding window 16: transformers passes a mask
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
        with blocked(model, CPU):
            assert torch.equal(model(input_ids=ids, use_cache=False).logits, stock)
    short = _model("llama")
    with torch.no_grad():
        ids = ids[:, :100]
        stock = short(input_ids=ids, use_cache=False).logits
        with blocked(short, CPU):
            assert torch.equal(short(input_ids=ids, use_cache=False).logits, stock)
    with blocked(short, torch.device("meta")):  # not a CPU: the model keeps its attention
        assert implementation(short) == "sdpa"


def test_eager_models_keep_their_attention(stories_dir):
    model = loading.load(str(stories_dir)).model
    model.set_attn_implementation("eager")
    with blocked(model, CPU):
        assert implementation(model) == "eager"


def test_the_baseline_forward_runs_the_models_own_attention_inside_training():
    model = _model("llama")
    ids = torch.randint(0, 512, (1, 512), generator=torch.Generator().manual_seed(4))
    forward = pace.plain_forward(model, ids)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *_: seen.append(implementation(model)))
    with blocked(model, CPU):
        forward()
        assert implementation(model) == NAME
    hook.remove()
    assert seen == ["sdpa"]
