"""The on-disk token cache: hits give the same ids without tokenizing, any change of tokenizer, text or sampler
is a miss, broken or unwritable caches are recomputed or skipped, and it can be switched off."""

import pytest
import torch

from taylorprune import pipeline
from taylorprune.calib import cache, sampling
from taylorprune.calib.text import Corpus
from taylorprune.modeling import loading

from .conftest import VALID


@pytest.fixture()
def demo_tokenizer():
    return loading.load("demo").tokenizer


@pytest.fixture()
def text(valid_text):
    return valid_text[:20000]  # enough for every window below, quick to tokenize


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TAYLORPRUNE_CACHE", str(folder))
    return folder


def entries(folder):
    return sorted((folder / "tokens").glob("*.safetensors")) if (folder / "tokens").exists() else []


def no_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized although the cache holds the ids")

    monkeypatch.setattr(sampling, "tokenize", boom)


def test_a_hit_gives_the_same_windows_without_tokenizing(fresh_cache, demo_tokenizer, text, monkeypatch):
    corpus = Corpus("v", text=text)
    first, spec = sampling.sample(demo_tokenizer, corpus, 4, 32, 5, "random", cache=True)
    assert torch.equal(first, sampling.sample(demo_tokenizer, corpus, 4, 32, 5, "random")[0])
    assert len(entries(fresh_cache)) == 1
    no_tokenizing(monkeypatch)
    again, spec2 = sampling.sample(demo_tokenizer, corpus, 4, 32, 5, "random", cache=True)
    assert torch.equal(again, first) and again.dtype == first.dtype and spec2 == spec


def test_tokenizer_text_and_sampler_settings_are_part_of_the_key(fresh_cache, demo_tokenizer, text,
                                                                 tiny_dirs):
    corpus = Corpus("v", text=text)
    base = dict(nsamples=4, seqlen=32, seed=5, sampling="random")
    variants = [base, {**base, "seed": 6}, {**base, "nsamples": 3}, {**base, "seqlen": 16},
                {**base, "sampling": "sequential"}]
    for v in variants:
        sampling.sample(demo_tokenizer, corpus, v["nsamples"], v["seqlen"], v["seed"], v["sampling"], cache=True)
    sampling.sample(demo_tokenizer, Corpus("v", text=text + " more"), 4, 32, 5, "random", cache=True)
    assert len(entries(fresh_cache)) == len(variants) + 1
    other = loading.load(str(tiny_dirs["llama"])).tokenizer  # same files, other folder: the same tokenizer
    assert cache.tokenizer_fingerprint(other) == cache.tokenizer_fingerprint(demo_tokenizer)
    demo_tokenizer.add_tokens(["<extra>"])
    assert cache.tokenizer_fingerprint(other) != cache.tokenizer_fingerprint(demo_tokenizer)


def test_a_corrupt_entry_is_recomputed_and_replaced(fresh_cache, demo_tokenizer, text):
    ids = sampling.tokenize_cached(demo_tokenizer, text)
    (entry,) = entries(fresh_cache)
    entry.write_bytes(b"not safetensors")
    assert torch.equal(sampling.tokenize_cached(demo_tokenizer, text), ids)
    assert entry.read_bytes() != b"not safetensors" and not list(entry.parent.glob(".*"))


def test_an_unwritable_or_disabled_cache_is_skipped(tmp_path, monkeypatch, demo_tokenizer, text):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("TAYLORPRUNE_CACHE", str(blocker / "cache"))  # a folder below a file: cannot exist
    ids = sampling.tokenize_cached(demo_tokenizer, text)
    assert torch.equal(ids, sampling.tokenize(demo_tokenizer, text))
    monkeypatch.setenv("TAYLORPRUNE_CACHE", "off")
    assert cache.cache_dir() is None
    assert torch.equal(sampling.tokenize_cached(demo_tokenizer, text), ids)
    monkeypatch.delenv("TAYLORPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "taylorprune"


def test_a_second_run_reads_calibration_and_evaluation_tokens_from_the_cache(tmp_path, fresh_cache, monkeypatch):
    opts = dict(model="demo", method="wanda", sparsity=0.5, calib_file=str(VALID), calib_sampling="sequential",
                nsamples=4, seqlen=64, eval=True, eval_text_file=str(VALID), eval_seqlen=64, max_windows=3)
    first = pipeline.prune(pipeline.RunOptions(output=str(tmp_path / "a"), **opts))
    assert len(entries(fresh_cache)) == 2  # calibration windows and the tokenized evaluation text
    no_tokenizing(monkeypatch)
    second = pipeline.prune(pipeline.RunOptions(output=str(tmp_path / "b"), **opts))
    assert second.metrics["perplexity"] == first.metrics["perplexity"] and second.spec == first.spec
    assert second.linears == first.linears
