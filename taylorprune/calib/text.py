"""Where calibration and evaluation text comes from: hub data sets (through ``datasets``), local files,
and the WikiText-2 copies bundled with taylorprune for offline use.

Each hub loader follows the split and joining used by SparseGPT / Wanda / GBLM-Pruner so that numbers are
comparable with the papers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from taylorprune.errors import UserError

GENERATED = "generated"  # sampled from the dense model itself (``calib.generate``), made where the model is
CALIB_SOURCES = ("c4", "wikitext2", "ptb", "wikitext2-valid", GENERATED)
EVAL_DATASETS = ("wikitext2", "c4", "ptb")


@dataclass(frozen=True)
class Corpus:
    """Either one long text (windows are cut anywhere) or documents (C4-style: one window per document).

    ``ids``: the text's tokens as they were made (generated text: the sampled ids, which re-tokenizing the decoded
    text need not give back); windows are then cut from them, never from the text."""

    name: str
    text: str | None = None
    docs: tuple[str, ...] | None = None
    ids: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def joined(self, sep: str = "\n\n") -> str:
        return self.text if self.text is not None else sep.join(self.docs or ())


def bundled_text(name: str) -> str:
    return (resources.files("taylorprune") / "assets" / "data" / name).read_text(encoding="utf-8")


def _hub(*args: object, **kwargs: object):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, missing data set, auth: all user-fixable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load {args[0]} through datasets ({first}); use --calib-file/--text-file offline"
        ) from None


def read_file(path: str | Path) -> Corpus:
    """A .txt file is one text; a .jsonl file is documents taken from each line's ``text`` field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if "\x00" in raw:
        raise UserError(f"{path} holds NUL bytes: not a text file")
    if p.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{lineno}: each line needs a string field 'text'")
            docs.append(record["text"])
        return Corpus(str(p), docs=tuple(docs))
    return Corpus(str(p), text=raw)


def calibration_corpus(name: str) -> Corpus:
    """Training splits, as the papers calibrate (C4 shard 00000 of ``en`` train, WikiText-2 / PTB train)."""
    if name == "wikitext2-valid":
        return Corpus(name, text=bundled_text("wikitext2_valid.txt"))
    if name == "wikitext2":
        data = _hub("wikitext", "wikitext-2-raw-v1", split="train")
        return Corpus(name, text=" ".join(data["text"]))
    if name == "ptb":
        data = _hub("ptb_text_only", "penn_treebank", split="train")
        return Corpus(name, text=" ".join(data["sentence"]))
    if name == "c4":
        data = _hub("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        return Corpus(name, docs=tuple(data["text"]))
    if name == GENERATED:
        raise UserError("--calib generated samples from the model, which this command has not loaded")
    raise UserError(f"--calib {name}: choose one of {', '.join(CALIB_SOURCES)} or give --calib-file")


def evaluation_text(name: str) -> str:
    """Test splits joined as the papers do; WikiText-2 comes from the bundled, byte-identical copy."""
    if name == "wikitext2":
        return bundled_text("wikitext2_raw_test.txt")
    if name == "ptb":
        return " ".join(_hub("ptb_text_only", "penn_treebank", split="test")["sentence"])
    if name == "c4":
        data = _hub(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        return " ".join(data[:1100]["text"])
    raise UserError(f"--dataset {name}: choose one of {', '.join(EVAL_DATASETS)} or give --text-file")
