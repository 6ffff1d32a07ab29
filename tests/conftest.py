"""Shared fixtures: tiny random LLaMA/Mistral/Qwen2 checkpoints built from configs, and stories260K."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# the same examples on every machine and every day: a property test that fails, fails for everyone, and CI never
# turns red on an example it happened to draw that day (run `pytest --hypothesis-seed=N` to explore further)
settings.register_profile("taylorprune", derandomize=True)
settings.load_profile("taylorprune")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "TAYLORPRUNE_CACHE" not in os.environ:  # the token cache of the tests' runs: never the user's ~/.cache
    os.environ["TAYLORPRUNE_CACHE"] = tempfile.mkdtemp(prefix="taylorprune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TAYLORPRUNE_CACHE"], True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEMO = ROOT / "taylorprune" / "assets" / "stories260K"
VALID = ROOT / "taylorprune" / "assets" / "data" / "wikitext2_valid.txt"
TEST_TEXT = ROOT / "taylorprune" / "assets" / "data" / "wikitext2_raw_test.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def tiny_config(arch: str, tied: bool = False):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=16, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":  # 5 sliding-window layers : 1 global, q/k norms, one KV head, tied embeddings
        gemma = dict(common, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     tie_word_embeddings=True)
        return Gemma3TextConfig(sliding_window=8, **gemma)
    raise ValueError(arch)


def make_tiny(folder: Path, arch: str = "llama", tied: bool = False, seed: int = 0) -> Path:
    """A random tiny checkpoint with the stories260K tokenizer (vocab 512), saved as an HF folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied), dtype=torch.float32)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    specs = {"llama": ("llama", False), "llama_tied": ("llama", True), "mistral": ("mistral", False),
             "qwen2": ("qwen2", True), "gemma3": ("gemma3", True)}
    return {key: make_tiny(base / key, arch, tied) for key, (arch, tied) in specs.items()}


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real stories260K as the package bundles it (the same files as ../shared/models/stories260K)."""
    return DEMO


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M (GGUF Q4_1) from ../shared: the one asset the package does not bundle."""
    path = SHARED / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("SmolLM2-135M GGUF absent: ../shared/models/smollm2-135m-instruct-q4_1 is not beside the repo")
    return path


@pytest.fixture(scope="session")
def valid_text() -> str:
    return VALID.read_text()
