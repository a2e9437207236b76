"""The results of an EDM-versus-DDPM comparison: which runs (``RunSpec``: net, sampler, NFE),
their scores per seed set (``Row``), paired differences, and the Markdown table of them.

Every row of one comparison used the same seed sets, so two rows differ by the sampler or net
only and ``paired_difference`` takes the mean ± SE of per-seed-set differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .metrics import mean_and_se
from .samplers_at_nfe import SAMPLER_LABELS, steps_for_nfe
from .scorers import Scorer

__all__ = [
    "Row",
    "RunSpec",
    "find_row",
    "format_score",
    "format_table",
    "paired_difference",
    "runs_for",
]

@dataclass(frozen=True)
class RunSpec:
    """One row of a comparison: which net (a key of the models dict), which sampler, which NFE."""

    model: str
    sampler: str
    nfe: int

    def label(self) -> str:
        return f"{self.model} net, {SAMPLER_LABELS[self.sampler]}"


def runs_for(model: str, sampler: str, nfes: Sequence[int]) -> list[RunSpec]:
    """RunSpecs for one net and sampler over several NFEs."""
    return [RunSpec(model, sampler, int(n)) for n in nfes]


@dataclass
class Row:
    """The result of one RunSpec: per-repeat scores, a few samples, and the time it took."""

    spec: RunSpec
    values: dict[str, list[float]] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    examples: torch.Tensor | None = None

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_and_se(self.values[metric])

    def to_json(self) -> dict:
        return {"model": self.spec.model, "sampler": self.spec.sampler, "nfe": self.spec.nfe,
                "steps": steps_for_nfe(self.spec.sampler, self.spec.nfe),
                "values": self.values, "pooled": self.pooled, "seconds": self.seconds,
                "mean_se": {m: self.stat(m) for m in self.values}}


def paired_difference(a: Row, b: Row, metric: str) -> tuple[float, float]:
    """mean ± SE over repeats of a - b; both rows used the same seed sets, so this is paired."""
    return mean_and_se([x - y for x, y in zip(a.values[metric], b.values[metric])])


def find_row(rows: Sequence[Row], model: str, sampler: str, nfe: int) -> Row | None:
    """The row of that net, sampler and NFE in ``rows``, or None."""
    return next((r for r in rows if r.spec == RunSpec(model, sampler, nfe)), None)


def format_score(mean: float, se: float) -> str:
    """A table cell: mean ± SE, 3 decimals below 10 and 2 above; the mean alone when SE is nan
    (a pooled score); "–" when the mean is nan."""
    if math.isnan(mean):
        return "–"
    digits = 3 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{mean:.{digits}f}"


def format_table(rows: Sequence[Row], scorer: Scorer, *, reference=None) -> str:
    """Markdown table: net, sampler, NFE, steps, each metric as mean ± SE (pooled ones as one
    value), seconds."""
    pooled = scorer.pooled_metrics
    head = ["net", "sampler", "NFE", "steps", *scorer.metrics, *pooled, "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row.spec
        steps = steps_for_nfe(s.sampler, s.nfe)
        cells = [s.model, SAMPLER_LABELS[s.sampler], str(s.nfe), str(steps),
                 *(format_score(*row.stat(m)) for m in scorer.metrics),
                 *(format_score(row.pooled.get(m, math.nan), math.nan) for m in pooled),
                 f"{row.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if reference is not None:
        cells = ["real data", "–", "–", "–",
                 *(format_score(*reference.get(m, (math.nan, math.nan)))
                   for m in (*scorer.metrics, *pooled)), "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
