"""Calibration windows and perplexity against direct computations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from taylorprune.calib.sampling import sample
from taylorprune.calib.text import Corpus, read_file
from taylorprune.errors import UserError
from taylorprune.evaluate.perplexity import perplexity
from taylorprune.modeling import loading


@pytest.fixture(scope="module")
def demo():
    return loading.load("demo")


def test_sequential_windows_are_slices_of_one_tokenization(demo, valid_text):
    ids, spec = sample(demo.tokenizer, Corpus("v", text=valid_text), 8, 64, 0, "sequential")
    whole = demo.tokenizer(valid_text, return_tensors="pt").input_ids[0]
    assert torch.equal(ids.flatten(), whole[: 8 * 64])
    assert spec.tokens == 512 and spec.sampling == "sequential"


def test_random_windows_are_seeded(demo, valid_text):
    corpus = Corpus("v", text=valid_text)
    a, _ = sample(demo.tokenizer, corpus, 4, 32, 7, "random")
    b, _ = sample(demo.tokenizer, corpus, 4, 32, 7, "random")
    c, _ = sample(demo.tokenizer, corpus, 4, 32, 8, "random")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_from_documents_uses_long_enough_documents(demo, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["short", "a much longer story " * 30]) + "\n")
    ids, _ = sample(demo.tokenizer, read_file(f), 3, 16, 0, "random")
    assert ids.shape == (3, 16)


def test_too_short_text_is_an_error(demo):
    with pytest.raises(UserError, match="too short"):
        sample(demo.tokenizer, Corpus("tiny", text="once upon a time"), 4, 128, 0, "sequential")


def test_bad_jsonl_is_an_error(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"txt": "x"}\n')
    with pytest.raises(UserError, match="text"):
        read_file(f)


def test_perplexity_equals_direct_computation(demo):
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside. " * 6
    res = perplexity(demo.model, demo.tokenizer, text, 32, "t", "demo")
    ids = demo.tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // 32
    nlls = []
    with torch.no_grad():
        for w in ids[: n * 32].view(n, 32):
            logits = demo.model(w[None]).logits[0, :-1]
            nlls.append(F.cross_entropy(logits, w[1:]).item())
    assert res.windows == n and res.tokens == n * 32
    assert res.perplexity == pytest.approx(math.exp(sum(nlls) / n), rel=1e-6)
    assert res.perplexity < 50  # a real model on its own domain
