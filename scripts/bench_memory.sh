#!/usr/bin/env bash
# Peak RSS of `run --method gblm` (gradient pass computed, no cache) against `run --method wanda` on SmolLM2,
# same calibration (32 × 512 sequential WikiText-2 validation windows), one thread each, no evaluation.
# Needs the dense folder made by scripts/bench_quality.py. Writes docs/bench_memory.md.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MODEL:-/tmp/taylorprune-bench/smollm2-135m-dense}
C="--calib-file ../shared/data/wikitext-2/valid.txt --calib-sampling sequential --nsamples 32 --seqlen 512"
C="$C --sparsity 0.5 --device cpu --overwrite"
out=docs/bench_memory.md
{
  echo "| command (\`OMP_NUM_THREADS=1 taylorprune run --model SmolLM2 ... --method\`) | peak RSS (MiB) | gradient pass (s) |"
  echo "| --- | ---: | ---: |"
} > "$out.tmp"
for cfg in "wanda" "gblm" "gblm --grad-checkpointing"; do
  name=$(echo "$cfg" | tr ' ' '_')
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 taylorprune run --model "$M" --method $cfg $C --output "/tmp/rss-$name" > "/tmp/rss-$name.log" 2>&1
  python - "$cfg" "/tmp/rss-$name/taylorprune_report.json" >> "$out.tmp" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
stats = r["phases_s"].get("model_statistics")
print(f"| `{sys.argv[1]}` | {r['peak_memory_mib']['rss_mib']:.0f} | {stats:.0f} |" if stats else
      f"| `{sys.argv[1]}` | {r['peak_memory_mib']['rss_mib']:.0f} | - |")
PY
done
mv "$out.tmp" "$out"
cat "$out"
