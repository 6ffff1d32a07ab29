"""The tables of scripts/bench_recover.py: recovered rows (pruned → recovered, with their targets), the rows
measured before under other settings, and the rows of block reconstruction alone (no recovery). The third domain
(licence texts, ``ppl_third``) came later than the rows first measured: a row without it shows "—"."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """What bench_recover measures: ``rows`` (name → (what, args)) pruned then recovered, ``recon_rows`` pruned
    only, ``targets`` name → (recon limit or None, recovered limit or None) in × dense WikiText PPL."""

    rows: dict[str, tuple[str, list[str]]]
    recon_rows: dict[str, tuple[str, list[str]]]
    targets: dict[str, tuple[float | None, float | None]]


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
    for rows, cost in ((plan.rows, "about 55 minutes a row"), (plan.recon_rows, "pruning only, about 20 minutes")):
        pending = [what for n, (what, _) in rows.items() if n not in results]
        if pending:
            lines += ["", f"Not measured yet ({cost} on 2 CPU cores): " + "; ".join(pending) + "."]
    lines += ["", "Targets (× dense WikiText-2 PPL, recovery tokens/s ÷ plain forward ≥ 0.20):", ""]
    lines += [_verdicts(plan, name, results, dense["ppl"], fwd) for name in plan.targets]
    return "\n".join(lines) + "\n"
