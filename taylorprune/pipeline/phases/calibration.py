"""Calibration phase: the calibration windows (when a later phase needs them), and every later phase's ``prepare``
(evaluation texts, recovery windows).

Both are cheap and both can fail on bad input (a text too short for the windows asked for), so they run right
after loading, before any heavy work; the record is the calibration's description (source, windows, sha256),
with the mix's choices (``mix``: each source's windows and the source of every window) and the generation's
record (``generated``) when the sources hold them (``pipeline.sources``). Generated text is sampled here, from the
dense model before anything is pruned. In a data-parallel run each rank keeps its own contiguous share of the
windows (``distributed``), and the record says how many each rank took.
"""

from __future__ import annotations

from taylorprune import distributed
from taylorprune.calib import sampling, text
from taylorprune.modeling.loading import window_start
from taylorprune.pipeline import sources
from taylorprune.pipeline.run_options import RunKind
from taylorprune.pipeline.state import Phase, RunFacts, RunState


def calibration_corpus(calib) -> text.Corpus:
    """The one text of ``calib`` (a file or a named set; a mix or generated text needs the run: ``sources``)."""
    return text.read_file(calib.calib_file) if calib.calib_file else text.calibration_corpus(calib.source)


def load_calibration(calib, tokenizer, seqlen: int, bos: int | None = None):
    """(windows [nsamples, seqlen], CalibSpec) of the calibration options ``calib``; ``bos``: what each window
    starts with (``modeling.loading.window_start``)."""
    return sampling.sample(tokenizer, calibration_corpus(calib), calib.nsamples, seqlen, calib.seed,
                           calib.calib_sampling, cache=True, bos=bos)


class Calibration(Phase):
    name = "calibration"
    label = "tokenizing calibration and evaluation text"

    def wanted(self, facts: RunFacts) -> bool:
        """Every run that changes the weights (an export writes them as they are, and reads no calibration text)."""
        return facts.kind != RunKind.EXPORT

    def check(self, plan) -> None:
        sources.check(plan)

    def run(self, state: RunState) -> dict | None:
        plan = state.plan
        extra: dict = {}
        with state.hooks.timed(state.phases_s, "calibration_data", self.label):
            if plan.calibrated:
                tokenizer = state.loaded.tokenizer
                ids, state.spec, extra = sources.windows(state, plan.seqlen,
                                                         window_start(state.model.config, tokenizer))
                share = distributed.world().share(len(ids))  # this rank's windows (all of them in one process)
                state.calib_ids = ids[share.start:share.stop]
            for phase in plan.phases:
                if phase is not self:
                    phase.prepare(state)
        if state.spec is None:
            return None
        world = distributed.world()
        record = state.spec.describe() | extra
        return record | ({"distributed": world.describe(state.spec.nsamples)} if world.active else {})
