"""The one registry of pruning methods: one line per method module.

The CLI, the pipeline, the sweep and the report find methods only through ``METHODS`` / ``get_method``.
"""

from __future__ import annotations

from taylorprune.errors import UserError
from taylorprune.scoring import fisher, gblm, magnitude, oba, sparsegpt, taylor, wanda
from taylorprune.scoring.spec import Method
from taylorprune.stats.registry import STATISTICS


def _index(*methods: Method) -> dict[str, Method]:
    out: dict[str, Method] = {}
    for m in methods:
        if m.name in out:
            raise TypeError(f"method {m.name!r} registered twice")
        unknown = set(m.statistics) - set(STATISTICS)
        for options in _option_samples(m):
            group = m.group_score(options)
            unknown |= set(group.statistics if group else ()) - set(STATISTICS)
        if unknown:
            raise TypeError(f"method {m.name} needs unregistered statistics {sorted(unknown)}")
        out[m.name] = m
    return out


def _option_samples(m: Method) -> list:
    """The method's default options and each valid choice of its choice options (to check every group score)."""
    samples = [m.options.build({})]
    for spec in m.options.specs():
        for choice in spec.choices or ():
            try:
                samples.append(m.options.build({spec.name: choice}))
            except UserError:  # a choice that needs another option set first (a mode's own option)
                continue
    return samples


DEFAULT_METHOD = "wanda"  # cheap, needs no gradients, and a sound baseline at every sparsity
BASELINES = ("magnitude", DEFAULT_METHOD)  # what a sweep compares when no methods are named

METHODS: dict[str, Method] = _index(
    magnitude.METHOD,
    wanda.METHOD,
    gblm.METHOD,
    taylor.METHOD,
    fisher.METHOD,
    sparsegpt.METHOD,
    oba.METHOD,
)


def group_summaries(m: Method) -> dict[str, str]:
    """What the method's structured score computes, per option setting that changes it ("" = the defaults)."""
    out: dict[str, str] = {}
    default = m.options.build({})
    for options in _option_samples(m):
        group = m.group_score(options)
        changed = ", ".join(f"{s.flag} {getattr(options, s.name)}" for s in m.options.specs()
                            if getattr(options, s.name) != getattr(default, s.name))
        text = group.summary if group else "none (use another method or option for --structure)"
        if text not in out.values():
            out[changed] = text
    return out


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"--method {name}: unknown; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
