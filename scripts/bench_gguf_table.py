"""The markdown of scripts/bench_gguf.py: the table, the targets with met / not met, tensor types, commands and
how to load each file. Kept apart so the runner stays short; it reads only the results JSON."""

from __future__ import annotations

from bench_quant import COMPACT_MADE

TITLE = "## GGUF and llama.cpp (issue #37)"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _ppl(r: dict, key: str, f32: dict | None) -> str:
    text = f"{r[key]['ppl']:.2f}"
    return text + (f" ({r[key]['ppl'] / f32[key]['ppl']:.3f})" if f32 else "")


def _speed(s: dict, which: str) -> str:
    low, high = s[f"{which}_spread"]
    return f"{s[f'{which}_tok_s']:.0f} ({s[f'{which}_ratio']:.2f}×, {low:.2f}–{high:.2f})"


def _load(s: dict) -> str:
    """The 1-minute load average before and after the row's ``speed`` call (2 cores: above 2, others were running)."""
    before, after = s.get("load") or (None, None)
    return "—" if before is None else f"{before:.1f}/{after:.1f}"


def _types(types: dict) -> str:
    """``TYPE×n`` over all tensors, then the roles whose tensors are not all of one type as the block linears."""
    total: dict[str, int] = {}
    for counts in types.values():
        for t, n in counts.items():
            total[t] = total.get(t, 0) + n
    roles = "; ".join(f"{role} " + ", ".join(f"{t}×{n}" for t, n in sorted(c.items()))
                      for role, c in types.items() if not role.endswith("norm"))
    return ", ".join(f"{t}×{n}" for t, n in sorted(total.items(), key=lambda kv: -kv[1])) + f" — {roles}"


def _gptq_note(env: dict) -> str:
    """Why GPTQ calibrated on fewer windows than the issue's 128, when it did."""
    if env.get("gptq_nsamples", 128) >= 128:
        return ""
    return (" (the issue asks for 128; on this machine that is well over 15 minutes: one forward over the 128 windows, "
            f"the imatrix pass, took {env.get('imatrix', {}).get('seconds', 0):.0f} s, and GPTQ runs every block "
            "twice and accumulates a Hessian per linear; GPTQ W4 g64 on 32 windows took 1706 s here for the "
            "quantization table)")


def _increase(results: dict, name: str, key: str) -> float | None:
    r, f32 = results.get(name), results.get("dense-f32")
    return r[key]["ppl"] - f32[key]["ppl"] if r and f32 else None


def targets(results: dict) -> list[str]:
    env = results.get("environment", {})
    out = []
    theirs = "llamacpp-q4_0-imatrix"
    parts = []
    gptq = [n for n in results if n.startswith("gptq-") and n.endswith("-embd-q8_0")]
    for ours in gptq:  # with llama.cpp's Q8_0 token_embd: the linears alone compared
        verdicts = []
        for key, domain in (("ppl", "WikiText-2"), ("ppl_second", "Python reference")):
            a, b = _increase(results, ours, key), _increase(results, theirs, key)
            if a is None or b is None:
                verdicts.append(f"{domain} not measured")
                continue
            verdicts.append(f"{domain} +{a:.2f} against +{b:.2f} = {a / b:.2f}× "
                            f"({'met' if a <= 0.7 * b else 'not met'})")
        parts.append(f"{ours}: " + ", ".join(verdicts))
    out.append("(a) GPTQ on the Q4_0 grid raises PPL over F32 by ≤ 0.7× what llama.cpp's Q4_0 with an importance "
               "matrix does (each GPTQ row with llama.cpp's Q8_0 token_embd, so the linears alone are compared) — "
               + ("; ".join(parts) or "not measured"))
    ref = results.get("llamacpp-q4_k_m-imatrix")
    size = f" (llama.cpp Q4_K_M + imatrix: {_mb(ref['file_bytes'])} MB, PPL {ref['ppl']['ppl']:.2f} / " \
           f"{ref['ppl_second']['ppl']:.2f})" if ref else ""
    out.append("(b) at the file size of llama.cpp's Q4_K_M + imatrix, our size-matched mixed GGUF has lower PPL on "
               f"both domains — not measured: no size-matched mixed row yet{size}")
    c = results.get("compact20-q4_k_m")
    out.append("(c) compact 20% at Q4_K_M decodes ≥ 1.2× the dense at the same type — " + (
        f"{c['speed']['decode_ratio']:.2f}× ({'met' if c['speed']['decode_ratio'] >= 1.2 else 'not met'})" if c
        else "not measured: the compact folder was not there when this ran"))
    f32 = results.get("dense-f32")
    if f32 and env.get("bf16_bytes"):
        ok = [(r["file_bytes"], r["ppl"]["ppl"], n) for n, r in results.items() if isinstance(r, dict) and "ppl" in r
              and r["ppl"]["ppl"] <= 1.30 * f32["ppl"]["ppl"]]
        size, _, name = min(ok)  # the smallest file, and of equal sizes the lowest PPL
        share = size / env["bf16_bytes"]
        out.append(f"(d) the smallest GGUF with WikiText-2 PPL ≤ 1.30× F32 is ≤ 0.25× the bf16 size "
                   f"({_mb(env['bf16_bytes'])} MB = 2 bytes × {env['parameters']:,} parameters) — {name}, "
                   f"{_mb(size)} MB = {share:.3f}× ({'met' if share <= 0.25 else 'not met'})" + _floor(env))
    else:
        out.append("(d) the smallest GGUF with WikiText-2 PPL ≤ 1.30× F32 is ≤ 0.25× the bf16 size — not measured")
    return out


def _floor(env: dict) -> str:
    """What the types allow at all: the fewest bytes of the dense model's GGUF per set of allowed types."""
    floors = env.get("size_floor")
    if not floors:
        return ""
    parts = []
    for label, f in floors.items():
        kinds = ", ".join(f"{k} {n / 1e6:.1f}M" for k, n in sorted(f["weights_by_type"].items(), key=lambda x: -x[1]))
        parts.append(f"{label}: {_mb(f['bytes'])} MB = {f['bytes'] / env['bf16_bytes']:.3f}× (weights: {kinds})")
    return (". Size floor of the dense model, every 2-D tensor at the smallest type whose block divides its rows "
            "(576-wide rows take 32-weight blocks only: 4.5 bits at least, or MXFP4's 4.25), norms F32 — "
            + "; ".join(parts) + ". So 0.25× is out of reach of any mix of ≥ 3-bit types; it needs MXFP4 (FP4 with "
            "power-of-two scales) on every 576-wide tensor and ffn_down at ≤ 2.9 bits, or ffn_down at 1.56 bits "
            "(IQ1_S), or fewer weights (a compact model)")


def _fallbacks(results: dict) -> str:
    r = results.get("llamacpp-q4_k_m")
    if not r:
        return "not measured yet"
    summary = next((s for s in r.get("summary", []) if "fallback" in s), "")
    kinds: dict[str, int] = {}
    for line in r.get("fallbacks", []):
        target = line.rsplit("falling back to", 1)[-1].strip()
        kinds[target] = kinds.get(target, 0) + 1
    return (f"llama.cpp's log: \"{summary.split(': ', 1)[-1]}\" (" + ", ".join(f"{n} to {t}" for t, n in
                                                                          sorted(kinds.items())) + ")")


def table(results: dict, rows: dict, baseline: dict) -> str:
    env = results.get("environment", {})
    f32 = results.get("dense-f32")
    lines = [TITLE, "",
             "SmolLM2-135M-Instruct as GGUF files, each measured in llama.cpp itself (llama-cpp-python "
             f"{env.get('llama_cpp_python', '?')}, CPU build, {env.get('threads', '?')} threads on "
             f"{env.get('cpu_cores', '?')} cores of an {env.get('cpu', '?')}): perplexity by llama-perplexity's "
             "protocol (`taylorprune eval --runtime llamacpp`, the first 40 × 512-token windows, the second half of "
             "each scored) on the WikiText-2 raw test split and on Python's language reference; prefill (512 "
             "tokens) and decode (128 tokens, batch 1) tokens/s by `taylorprune speed --runtime llamacpp` against "
             "the dense model's GGUF of the same type, in 5 interleaved rounds in one process (median ratio, its "
             "spread in the brackets; the F32 and F16 rows are timed against themselves, which shows the noise). "
             "Everything ran with `nice -n 5` on a shared 2-core machine: the perplexities while other sessions' "
             "pruning runs and tests used the same cores (load average 4–7, which changes no PPL), the timings all "
             "again afterwards in one go once the machine was quiet (the load column: the 1-minute load average "
             "before/after each row's `speed` call, our own two llama.cpp threads included; under the earlier load "
             "the same calls gave spreads up to 0.06–14×, kept as `speed-under-load.json` in the work folder). "
             "Read tokens/s as this machine's, and only ratios from one `speed` call as comparable. "
             "Importance matrix: `taylorprune "
             f"imatrix` on {env.get('imatrix_windows', 128)} × 512 sequential windows of the bundled WikiText-2 "
             "validation text; GPTQ calibrates on "
             f"{env.get('gptq_nsamples', '?')} × 512 windows of the same text"
             + _gptq_note(env) + ". Made by `python scripts/bench_gguf.py` "
             "(raw figures in `docs/bench_gguf.json`).", "",
             "Caveats: SmolLM2's published file is Q4_1, so the dense weights already lie on a 4-bit asymmetric "
             "group-32 grid; re-writing Q4_1 would compare nothing, and Q4_0 (symmetric, another grid) and Q4_K_M "
             "are real roundings of it. Its hidden width 576 is no multiple of 256, so K-quant tensors with 576 "
             "columns fall back (Q4_K to Q5_0, Q6_K to Q8_0; only ffn_down, 1536 columns, keeps K-quants): "
             f"{_fallbacks(results)}. Our Q4_K_M packer follows the same rule (tensor types below). Our "
             "`--gguf-type Q4_0` writes every 2-D tensor as Q4_0, the tied `token_embd` (SmolLM2's output head "
             "too) included, where llama-quantize's Q4_0 file type gives the output tensor (here the tied "
             "embedding) Q6_K, which the 576 columns turn into Q8_0: the `*-embd-q8_0` rows are our files with "
             "llama.cpp's Q8_0 `token_embd` put in (`graft` in the script; every other tensor and key as written), "
             "which compares the linears alone (llama.cpp's Q4_0 with an imatrix also gives the first eighth of "
             "the ffn_down tensors Q4_1, three here; ours keeps Q4_0).", ""]
    if f32:
        lines += [f"F32: WikiText-2 PPL {f32['ppl']['ppl']:.2f}, Python-reference PPL {f32['ppl_second']['ppl']:.2f}; "
                  f"bf16 size {_mb(env.get('bf16_bytes', 0))} MB.", ""]
    lines += ["| row | file | MB | × bf16 | WikiText-2 PPL (× F32) | Python-ref PPL (× F32) | prefill tok/s (× base) "
              "| decode tok/s (× base) | speed baseline | load |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name in rows:
        r = results.get(name)
        if not r:
            lines.append(f"| {rows[name].what} | {name} | — | — | not measured | not measured | — | — | "
                         f"{baseline[rows[name].gguf_type]} | — |")
            continue
        share = f"{r['file_bytes'] / env['bf16_bytes']:.3f}" if env.get("bf16_bytes") else "—"
        lines.append(f"| {r['what']} | {name} | {_mb(r['file_bytes'])} | {share} | {_ppl(r, 'ppl', f32)} | "
                     f"{_ppl(r, 'ppl_second', f32)} | {_speed(r['speed'], 'prefill')} | "
                     f"{_speed(r['speed'], 'decode')} | {r['speed']['baseline']} | {_load(r['speed'])} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(results)]
    lines += ["", "Tensor types read back with the `gguf` package (all tensors, then per role):", ""]
    lines += [f"- {n}: {_types(r['tensor_types'])}" for n in rows if (r := results.get(n))]
    lines += ["", "Commands (`$DENSE`: the fp32 folder, `$WORK`: the scratch folder, `$COMPACT`: the recovered "
              f"compact folder, made by `{COMPACT_MADE}` (FFN 1536 → 960 in every layer, heads kept; 960 is no "
              "multiple of 256, so its ffn_down falls back from K-quants as the 576-column tensors do); each file "
              "then measured by "
              "`taylorprune eval --runtime llamacpp --model $WORK/ROW/model.gguf --text-file TEXT --seqlen 512 "
              "--max-windows 40 --llamacpp-threads N` and `taylorprune speed --runtime llamacpp --model "
              "$WORK/ROW/model.gguf --baseline $WORK/BASE/model.gguf --llamacpp-threads N`):", ""]
    if env.get("imatrix"):
        lines.append(f"- imatrix: `{env['imatrix']['command']}` ({env['imatrix']['seconds']:.0f} s)")
    lines += [f"- {n}: `{r['command']}` ({r['build_s']:.0f} s)" for n in rows if (r := results.get(n))]
    lines += ["", "How to load each file (copy `$WORK/ROW/model.gguf` to `ROW.gguf`): llama.cpp `llama-cli -m "
              "ROW.gguf`; ollama, a `Modelfile` holding `FROM ./ROW.gguf`, then `ollama create ROW -f Modelfile`:", ""]
    lines += [f"- {n}: `llama-cli -m {n}.gguf` · Modelfile `FROM ./{n}.gguf`" for n in rows if n in results]
    return "\n".join(lines) + "\n"
