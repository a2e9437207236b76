"""EDM versus DDPM: sample at a given NFE, score the samples, repeat over seed sets, report.

The parts, each in its own module:

    samplers_at_nfe.py    the five samplers by name, steps <-> NFE, sample_at_nfe
    scorers.py            feature-space FD + accuracy (digits, labelled images), toy scores
    comparison_rows.py    RunSpec, Row, paired differences, the Markdown table
    comparison_plots.py   quality against NFE, sheets of paired samples

This module runs a comparison (``compare``), scores real data at the same sample count
(``reference_row``, the floor a perfect sampler reaches) and writes the report
(``write_report``). It also re-exports the names above, so that ``from edm_fast.eval.compare
import X`` works for all of them.

Repeats: repeat r uses seeds r*n .. r*n + n - 1 (``SeedNoise``: a sample depends only on its
seed), so every sampler and net sees the same initial noise and the comparison is paired. When
the samples per seed set are fewer than the scorer's feature dimensions the FD is dominated by
small-sample bias: ``compare`` warns, and ``Scorer.bias_note`` gives the note for the report.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..io.samples import existing_ancestor
from .comparison_plots import plot_quality_vs_nfe, plot_sample_sheet
from .comparison_rows import (
    Row,
    RunSpec,
    find_row,
    format_score,
    format_table,
    paired_difference,
    runs_for,
)
from .metrics import mean_and_se
from .samplers_at_nfe import (
    CHURN,
    SAMPLER_LABELS,
    SAMPLER_NAMES,
    nfe_for_steps,
    sample_at_nfe,
    sigma_grid,
    steps_for_nfe,
)
from .scorers import (
    ClassifierScorer,
    DigitsScorer,
    LabelledDataScorer,
    Scorer,
    ToyScorer,
    check_reference_size,
    real_digit_labels,
)

__all__ = [
    "CHURN",
    "REPORT_FILES",
    "SAMPLER_LABELS",
    "SAMPLER_NAMES",
    "ClassifierScorer",
    "DigitsScorer",
    "LabelledDataScorer",
    "Row",
    "RunSpec",
    "Scorer",
    "ToyScorer",
    "check_reference_size",
    "check_report_folder",
    "compare",
    "find_row",
    "format_table",
    "nfe_for_steps",
    "paired_difference",
    "plot_quality_vs_nfe",
    "plot_sample_sheet",
    "real_digit_labels",
    "reference_row",
    "runs_for",
    "sample_at_nfe",
    "sigma_grid",
    "steps_for_nfe",
    "strict_json",
    "write_report",
]

REPORT_FILES = ("table.md", "quality_vs_nfe.png", "samples.png", "results.json")


def compare(models: dict, runs: Sequence[RunSpec], scorer: Scorer, *, samples: int,
            repeats: int, batch: int = 256, churn: dict | None = None, keep: int = 40,
            log: Callable[[str], None] | None = print) -> list[Row]:
    """Score every RunSpec on ``repeats`` disjoint seed sets of ``samples`` seeds each.

    The sizes are checked first (``Scorer.check_sizes``), and a warning is given when the FD
    would be dominated by small-sample bias (``Scorer.bias_note``)."""
    scorer.check_sizes(samples, repeats)
    note = scorer.bias_note(samples, repeats)
    if note:
        warnings.warn(note, stacklevel=2)
    rows = []
    for spec in runs:
        row, start, pool = Row(spec), time.perf_counter(), []
        for r in range(repeats):
            seeds = range(r * samples, (r + 1) * samples)
            labels = scorer.labels(seeds)
            x = sample_at_nfe(models[spec.model], spec.sampler, spec.nfe, seeds, scorer.shape,
                              class_labels=labels, batch=batch, churn=churn)
            for name, value in scorer(x, labels, r).items():
                row.values.setdefault(name, []).append(value)
            pool.append(x)
        row.examples = pool[0][:keep]
        if scorer.pooled_metrics:
            row.pooled = scorer.pooled(torch.cat(pool), scorer.labels(range(repeats * samples)))
        row.seconds = time.perf_counter() - start
        rows.append(row)
        if log is not None:
            scores = ", ".join(f"{m} {format_score(*row.stat(m))}" for m in scorer.metrics)
            log(f"{spec.label()} @ {spec.nfe} NFE: {scores} ({row.seconds:.0f} s)")
    return rows


def reference_row(scorer: Scorer, *, samples: int, repeats: int) -> dict[str, tuple[float, float]]:
    """mean ± SE of the scores of real samples at the same sample count (the floor); pooled
    scores (one value, SE = nan) at samples * repeats."""
    scorer.check_reference_sizes(samples, repeats)  # only the real-data rows draw real data
    values: dict[str, list[float]] = {}
    for r in range(repeats):
        for name, value in scorer.reference(samples, r).items():
            values.setdefault(name, []).append(value)
    out = {name: mean_and_se(v) for name, v in values.items()}
    pooled = scorer.reference_pooled(samples * repeats)
    return out | {name: (value, float("nan")) for name, value in pooled.items()}


def check_report_folder(out, prefix: str | None = None) -> Path:
    """Raise ValueError now, before any sampling, if ``write_report`` could not write its files
    into the folder ``out``: a file in its place, a file among its parents, a folder where a
    {prefix}_* report file goes, or no write permission. Missing folders are fine (they are
    created, as ``write_report`` does)."""
    if not os.fspath(out).strip():  # Path("") is the current folder
        raise ValueError("--out is empty: name the folder for the report, e.g. compare-out")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    for name in REPORT_FILES if prefix else ():
        if (out / f"{prefix}_{name}").is_dir():
            raise ValueError(f"--out {out}: {prefix}_{name} there is a folder, not a file")
    ancestor = existing_ancestor(out)
    if not ancestor.is_dir():
        raise ValueError(f"cannot create --out {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {out}: {ancestor} is not a writable folder")
    return out



def strict_json(value):
    """NaN -> None, recursively, so the JSON is strict (NaN is not JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(rows: Sequence[Row], scorer: Scorer, out, prefix: str, *, reference=None,
                 mixture=None, title: str = "", notes: str = "") -> dict[str, Path]:
    """Write {prefix}_table.md, {prefix}_quality_vs_nfe.png, {prefix}_samples.png and
    {prefix}_results.json (raw per-repeat scores) into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(("table", "plot", "samples", "json"),
                     (out / f"{prefix}_{name}" for name in REPORT_FILES)))
    table = format_table(rows, scorer, reference=reference)
    paths["table"].write_text((f"## {title}\n\n" if title else "") + table
                              + (f"\n{notes}\n" if notes else ""))
    plot_quality_vs_nfe(rows, scorer, paths["plot"], reference=reference, title=title)
    plot_sample_sheet(rows, paths["samples"], mixture=mixture)
    data = {"scorer": scorer.name, "rows": [r.to_json() for r in rows],
            "reference": reference, "notes": notes}
    paths["json"].write_text(json.dumps(strict_json(data), indent=1))
    return paths
