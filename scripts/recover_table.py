"""The tables of scripts/bench_recover.py: recovered rows (pruned → recovered, with their targets), the rows
measured before under other settings, and the rows of block reconstruction alone (no recovery). The third domain
(licence texts, ``ppl_third``) came later than the rows first measured: a row without it shows "—"."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Plan:
    """What bench_recover measures: ``rows`` (name → (what, args)) pruned then recovered, ``recon_rows`` pruned
    only, ``targets`` name → (recon limit or None, recovered limit or None) in × dense WikiText PPL; ``sources``
    row → (base row, source key) for the rows recovered on another text (issue #38), ``source_targets`` base row →
    (Python-reference limit, WikiText limit) in × dense, met by any of the base's rows."""

    rows: dict[str, tuple[str, list[str]]]
    recon_rows: dict[str, tuple[str, list[str]]]
    targets: dict[str, tuple[float | None, float | None]]
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)
    source_targets: dict[str, tuple[float, float]] = field(default_factory=dict)


def _ratio(value: float, dense: float) -> str:
    return f"{value / dense:.3f}"


def _third(dense: dict, *measured: dict) -> str:
    """Licence-text PPL of the pruned (→ recovered) model with its ratios to dense; "—" for a row measured before
    the third domain existed."""
    if "ppl_third" not in dense or any("ppl_third" not in m for m in measured):
        return "—"
    ppl = " → ".join(f"{m['ppl_third']:.2f}" for m in measured)
    return f"{ppl} ({' → '.join(_ratio(m['ppl_third'], dense['ppl_third']) for m in measured)})"


def _verdict(label: str, value: float | None, limit: float, below: bool = True) -> str:
    if value is None:
        return f"{label} ≤ {limit:.2f}: not measured yet" if below else f"{label} ≥ {limit:.2f}: not measured yet"
    met = value <= limit if below else value >= limit
    return f"{label} {value:.3f} ({'met' if met else 'missed'}: {'≤' if below else '≥'} {limit:.2f})"


def _verdicts(plan: Plan, name: str, results: dict, dense: float, fwd: float | None) -> str:
    """One bullet: each target of a row beside its measured figure."""
    recon, recovered = plan.targets[name]
    r = results.get(name)
    parts = [_verdict("recon", r and r["pruned"]["ppl"] / dense, recon)] if recon else []
    if recovered:
        parts.append(_verdict("recovered", r and r["recovered"]["ppl"] / dense, recovered))
        parts.append(_verdict("cost", r and fwd and r["recover"]["tokens_per_s"] / fwd, 0.20, below=False))
    what = {**plan.rows, **plan.recon_rows}[name][0]
    return f"- {what}: " + "; ".join(parts)


def _settings(record: dict) -> str:
    """How a row's recovery ran, from its report: peak lr, sampling (absent: the draws of earlier versions) and
    whether the loss was made in chunks from the final hidden states (absent: from whole logits, before
    ``recover.head_kl``; the same loss, slower)."""
    chunked = ", chunked loss" if record.get("loss") == "chunked" else ""
    return f"lr {record['recover_lr']:.0e}, {record.get('recover_sampling', 'random')}{chunked}".replace("e-0", "e-")


def _superseded(rows: list[dict], dense: dict, fwd: float | None) -> list[str]:
    """Rows measured before under other recovery settings, one line each (the table above holds the latest)."""
    if not rows:
        return []
    out = ["", "Measured before under other recovery settings (same pruned models):", ""]
    for r in rows:
        q, rec = r["recovered"], r["recover"]
        out.append(f"- {r['what']} ({_settings(rec)}): recovered WikiText {q['ppl']:.2f} "
                   f"({_ratio(q['ppl'], dense['ppl'])}×), Python reference "
                   f"{_ratio(q['ppl_second'], dense['ppl_second'])}×, "
                   + ("" if _third(dense, q) == "—" else f"licences {_ratio(q['ppl_third'], dense['ppl_third'])}×, ")
                   + f"held-out KL {rec['kl_after']:.3f}, "
                   f"{rec['tokens_per_s']:.0f} tok/s"
                   + (f" ({rec['tokens_per_s'] / fwd:.2f})" if fwd else "")
                   + (f"; {r['note']}" if r.get("note") else ""))
    return out


def _recon_only(plan: Plan, results: dict, dense: dict) -> list[str]:
    """The rows pruned with block reconstruction and not recovered."""
    done = [results[n] for n in plan.recon_rows if n in results]
    if not done:
        return []
    out = ["", "Block reconstruction alone (no recovery; same calibration and evaluation):", "",
           "| configuration | WikiText PPL (× dense) | Python-reference PPL (× dense) | licence-text PPL (× dense) "
           "| last-word acc | prune s |",
           "| --- | --- | --- | --- | --- | ---: |"]
    for r in done:
        p = r["pruned"]
        out.append(f"| {r['what']} | **{p['ppl']:.2f}** ({_ratio(p['ppl'], dense['ppl'])}) | {p['ppl_second']:.2f} "
                   f"({_ratio(p['ppl_second'], dense['ppl_second'])}) | {_third(dense, p)} | {p['lastword']:.4f} | "
                   f"{r['prune_s']:.0f} |")
    return out


def _generation(rec: dict) -> str:
    g = rec.get("generated")
    if not g:
        return "—"
    made = f"{g['sampled_tokens']:,} tokens in {g['seconds']:.0f} s = {g['tokens_per_s']:.0f} tok/s"
    return made + (" (sampled by an earlier run, reused from its cache)" if g.get("reused") else "")


def _per_source(rec: dict) -> str:
    rows = rec.get("sources")
    if not rows:
        return "—"
    return "; ".join(f"{r['source']} {r['kl_before']:.3f} → {r['kl_after']:.3f}" for r in rows)


def _source_targets(plan: Plan, results: dict, dense: dict) -> list[str]:
    """Issue #38's targets, each beside the figure: the best Python-reference ratio of a base row's recoveries
    with its WikiText ratio, and whether every other source beats WikiText-only recovery on the licences."""
    out = []
    for base, (py_limit, wiki_limit) in plan.source_targets.items():
        names = [base, *(n for n, (b, _) in plan.sources.items() if b == base)]
        done = [(n, results[n]["recovered"]) for n in names if n in results]
        if not done:
            out.append(f"- {plan.rows[base][0]}: Python reference ≤ {py_limit:.2f}× with WikiText-2 ≤ "
                       f"{wiki_limit:.2f}×: not measured yet")
            continue
        ok = [(q["ppl_second"] / dense["ppl_second"], q["ppl"] / dense["ppl"], n) for n, q in done]
        meets = [x for x in ok if x[0] <= py_limit and x[1] <= wiki_limit]
        py, wiki, n = min(meets or ok)
        out.append(f"- {plan.rows[base][0]}: Python reference ≤ {py_limit:.2f}× with WikiText-2 ≤ {wiki_limit:.2f}× "
                   f"— best {n}: {py:.3f}× / {wiki:.3f}× ({'met' if meets else 'missed'})")
        wiki_only = results.get(base, {}).get("recovered", {}).get("ppl_third")
        others = [(n, q["ppl_third"]) for n, q in done if n != base and "ppl_third" in q]
        if wiki_only is None:
            out.append(f"- licence texts, {plan.rows[base][0]}: every other source below WikiText-only recovery — "
                       "not measured yet (the WikiText-only row predates the third domain)")
        elif others:
            better = all(v < wiki_only for _, v in others)
            out.append(f"- licence texts, {plan.rows[base][0]}: every other source below WikiText-only recovery's "
                       f"{wiki_only:.2f} — " + ", ".join(f"{n} {v:.2f}" for n, v in others)
                       + f" ({'met' if better else 'missed'})")
    return out


def _sources(plan: Plan, results: dict, dense: dict) -> list[str]:
    """Issue #38's data-source axis: each base row recovered on WikiText-2, on the teacher's own text, on the mix."""
    if not plan.sources or "ppl_third" not in dense:
        return []
    out = ["", "### Recovery data sources (issue #38)", "",
           "Each base row's pruned model recovered at the same tokens on each source; × dense after recovery. The "
           "held-out KL is on held-out windows of the row's own source, so it compares steps within a row, not "
           "sources.", "",
           "| pruned model | recovered on | WikiText-2 | Python reference | licence texts | held-out KL | held-out KL "
           "per source | generation |", "| --- | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for base in dict.fromkeys(b for b, _ in plan.sources.values()):
        for n in [base, *(n for n, (b, _) in plan.sources.items() if b == base)]:
            r = results.get(n)
            if r is None:
                continue
            q, rec = r["recovered"], r["recover"]
            source = plan.sources[n][1] if n in plan.sources else "WikiText-2 validation"
            third = _ratio(q["ppl_third"], dense["ppl_third"]) if "ppl_third" in q else "—"
            out.append(f"| {plan.rows[base][0]} | {source} | {_ratio(q['ppl'], dense['ppl'])} | "
                       f"{_ratio(q['ppl_second'], dense['ppl_second'])} | {third} "
                       f"| {rec['kl_before']:.3f} → {rec['kl_after']:.3f} | {_per_source(rec)} | {_generation(rec)} |")
    return out + ["", "Targets (issue #38):", "", *_source_targets(plan, results, dense)]


def table(plan: Plan, results: dict) -> str:
    dense, second, third = results.get("dense"), results.get("second_domain", {}), results.get("third_domain")
    if dense is None:
        return ""
    fwd = results.get("forward_tokens_per_s")
    lines = ["## Recovery by distillation (issue #23)", "",
             "SmolLM2-135M-Instruct. Each configuration pruned (calibration 128 × 512 WikiText-2 validation windows), "
             "then recovered by `taylorprune recover --teacher DENSE` on WikiText-2 validation (534 windows × 512, "
             "8 held out, 260 steps × 4 windows = 532,480 tokens = 1.98 passes over the 526 training windows, "
             "AdamW at the peak lr each row names, KL at T = 1, every decoder-block parameter trained, masks kept; "
             "batches either walk shuffles of the windows (epoch: each seen twice) or are drawn afresh each step "
             "(random, the rows measured before `--recover-sampling` existed)). "
             "PPL on 40 × 512 windows of WikiText-2 test and, as "
             "a second domain neither calibration nor recovery saw, of Python's language reference (`pydoc_data."
             f"topics` of CPython {second.get('python', '?')}, sha256 {second.get('sha256', '?')[:12]}…)"
             + (f" and, as a third, legal prose: the {len(third['files'])} licence texts of /usr/share/common-licenses "
                f"({third['os']}, base-files {third['base_files']}; {third['bytes']:,} bytes, sha256 "
                f"{third['sha256'][:12]}…; — for rows measured before it)" if third else "")
             + ". Rows recovered on another source (issue #38's data-source axis) say so, at the same tokens. "
             "Made by `python scripts/bench_recover.py` (raw numbers in `docs/bench_recover.json`).", "",
             f"Dense: WikiText-2 PPL {dense['ppl']:.2f}, Python-reference PPL {dense['ppl_second']:.2f}, "
             + (f"licence-text PPL {dense['ppl_third']:.2f}, " if "ppl_third" in dense else "") + "last-word "
             f"acc {dense['lastword']:.4f}; plain forward {fwd:.0f} tokens/s (batch 4 × 512)." if fwd else "", "",
             "| configuration | WikiText PPL pruned → recovered (× dense) | Python-reference PPL pruned → recovered "
             "(× dense) | licence-text PPL pruned → recovered (× dense) | last-word acc | held-out KL | recovery tok/s "
             "(÷ forward) | recovery s (process wall s) |",
             "| --- | --- | --- | --- | --- | --- | --- | ---: |"]
    for name in plan.rows:
        r = results.get(name)
        if r is None:
            continue
        p, q, rec = r["pruned"], r["recovered"], r["recover"]
        lines.append(
            f"| {r['what']} ({_settings(rec)}) | {p['ppl']:.2f} → **{q['ppl']:.2f}** "
            f"({_ratio(p['ppl'], dense['ppl'])} → "
            f"{_ratio(q['ppl'], dense['ppl'])}) | {p['ppl_second']:.2f} → {q['ppl_second']:.2f} "
            f"({_ratio(p['ppl_second'], dense['ppl_second'])} → {_ratio(q['ppl_second'], dense['ppl_second'])}) | "
            f"{_third(dense, p, q)} | {p['lastword']:.4f} → {q['lastword']:.4f} | "
            f"{rec['kl_before']:.3f} → {rec['kl_after']:.3f} | "
            f"{rec['tokens_per_s']:.0f} ({rec['tokens_per_s'] / fwd:.2f}) | {rec['seconds']:.0f} "
            f"({r['recover_wall_s']:.0f}) |")
    lines += _superseded(results.get("superseded", []), dense, fwd)
    notes = [f"- {results[n]['what']}: {results[n]['note']}" for n in plan.rows if results.get(n, {}).get("note")]
    if notes:
        lines += ["", "Notes on single rows:", "", *notes]
    lines += _recon_only(plan, results, dense)
    lines += _sources(plan, results, dense)
    for rows, cost in ((plan.rows, "about 55 minutes a row"), (plan.recon_rows, "pruning only, about 20 minutes")):
        pending = [what for n, (what, _) in rows.items() if n not in results]
        if pending:
            lines += ["", f"Not measured yet ({cost} on 2 CPU cores): " + "; ".join(pending) + "."]
    lines += ["", "Targets (× dense WikiText-2 PPL, recovery tokens/s ÷ plain forward ≥ 0.20):", ""]
    lines += [_verdicts(plan, name, results, dense["ppl"], fwd) for name in plan.targets]
    return "\n".join(lines) + "\n"
