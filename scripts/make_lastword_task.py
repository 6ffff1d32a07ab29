"""Build the bundled lm-eval task ``wikitext_lastword``: LAMBADA-style last-word prediction on WikiText-2 test.

From each paragraph of the bundled WikiText-2 raw test text (headings skipped) that ends with " ." and whose last
word is alphabetic, the example is the paragraph without the final " ." (its last 120 words at most, cut at a
sentence start where one is near): the model sees all but the last word and must predict it (``acc``: the word
is the greedy continuation). The first 500 such paragraphs, in order, so the file is deterministic:

    python scripts/make_lastword_task.py   # writes taylorprune/assets/tasks/wikitext_lastword.{jsonl,yaml}
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "taylorprune" / "assets" / "data" / "wikitext2_raw_test.txt"
OUT = ROOT / "taylorprune" / "assets" / "tasks"
EXAMPLES, MAX_WORDS, MIN_WORDS = 500, 120, 24
YAML = """# LAMBADA-style last-word accuracy on WikiText-2 test paragraphs (scripts/make_lastword_task.py).
# taylorprune writes {data} as the absolute path of the jsonl beside this file before lm-eval reads it.
task: wikitext_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: loglikelihood
test_split: test
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def example(paragraph: str) -> str | None:
    """The paragraph as one example (context words + the target word), or None when it does not qualify."""
    text = paragraph.strip()
    if not text.endswith(" .") or text.startswith("="):
        return None
    words = text[:-2].split(" ")
    if not words[-1].isalpha() or len(words) < MIN_WORDS:
        return None
    if len(words) > MAX_WORDS:
        tail = words[-MAX_WORDS:]
        starts = [i + 1 for i, w in enumerate(tail[:-MIN_WORDS]) if w == "."]
        words = tail[starts[0]:] if starts else tail
    return " ".join(words)


def main() -> None:
    found = [e for e in (example(p) for p in TEXT.read_text().split("\n")) if e]
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": e}, ensure_ascii=False) for e in found[:EXAMPLES]]
    (OUT / "wikitext_lastword.jsonl").write_text("\n".join(lines) + "\n")
    (OUT / "wikitext_lastword.yaml").write_text(YAML)
    print(f"{len(lines)} examples of {len(found)} qualifying paragraphs")


if __name__ == "__main__":
    main()
