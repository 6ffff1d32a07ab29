"""Structured pruning (``--structure``): structures of a LLaMA-class decoder removed for real.

``spec`` (kinds, options, the ``STRUCTURES`` registry), ``groups`` (what goes together, group scores' reduction,
choice), ``shape`` (counts, widths, config checks), ``surgery`` (compensation, slicing, config), ``depth``
(whole blocks).
"""

from taylorprune.prune.structures.groups import (
    Groups,
    Member,
    all_groups,
    attention_of,
    choose,
    groups_of,
    groups_to_remove,
    reduce_groups,
)
from taylorprune.prune.structures.shape import (
    Shape,
    aligned_counts,
    check_config,
    counts_for_target,
    removal_counts,
    widths_after,
)
from taylorprune.prune.structures.spec import (
    CONSUMER_STATS,
    KINDS,
    STRUCTURES,
    WIDTH_KINDS,
    Structure,
    parse_structures,
)
from taylorprune.prune.structures.surgery import (
    compensate,
    count_parameters,
    remove,
    take_out,
    update_config,
    zero,
)

__all__ = ["CONSUMER_STATS", "KINDS", "STRUCTURES", "WIDTH_KINDS", "Groups", "Member", "Shape", "Structure",
           "aligned_counts", "all_groups", "attention_of", "check_config", "choose", "compensate", "count_parameters",
           "counts_for_target", "groups_of", "groups_to_remove", "parse_structures", "reduce_groups",
           "removal_counts", "remove", "take_out", "update_config", "widths_after", "zero"]
