"""Choosing a post-hoc EMA length on a metric: the sweep behind ``edm-fast phema --sweep``.

EDM2 (Karras et al. 2024, Sec. 3) picks the EMA length after training, by reconstructing many
sigma_rel (Alg. 3) and keeping the one that scores best. The reconstruction
(``train.phema_snapshots``) knows nothing of metrics; this module scores its checkpoints: each
is sampled with EDM's Heun sampler at ``nfe`` evaluations on ``repeats`` disjoint seed sets (the
same seeds for every sigma_rel, so the comparison is paired) and scored by
``scorers.DigitsScorer``: the feature FD of a digits classifier (not Inception-FID) and the
classifier accuracy. The best sigma_rel is the one with the lowest mean FD. That scorer knows
the bundled digits data only, so a run on other data is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import EdmFastError
from .compare import compare, runs_for
from .comparison_rows import Row
from .scorers import DigitsScorer

__all__ = ["require_digits", "sweep_sigma_rel"]


def require_digits(data_name: str | None) -> None:
    """EdmFastError (one line) unless a run's data (its metadata's data name) is the digits."""
    if data_name != "digits":
        raise EdmFastError(f"--sweep scores with the digits classifier (feature FD, accuracy), "
                           f"so it needs a run on the digits data; this run's data is "
                           f"{data_name!r}")


def sweep_sigma_rel(paths: Sequence, sigma_rels: Sequence[float], *, samples: int = 200,
                    repeats: int = 2, nfe: int = 35,
                    log: Callable[[str], None] | None = print) -> tuple[list[Row], float]:
    """(one scored Row per sigma_rel, the sigma_rel of lowest mean FD) for the reconstructed
    checkpoints ``paths`` (one per value of ``sigma_rels``, as ``reconstruct_snapshots``
    returns them). EdmFastError (one line) for a run that is not on the digits data."""
    from ..io.checkpoints import load_denoiser_checkpoint
    from ..io.model_card import model_card

    if len(paths) != len(sigma_rels) or not paths:
        raise ValueError(f"{len(paths)} checkpoints for {len(sigma_rels)} sigma_rel values")
    models = {f"sigma_rel {s:.3f}": load_denoiser_checkpoint(p)
              for s, p in zip(sigma_rels, paths)}
    card = model_card(next(iter(models.values())))
    require_digits((card.config.get("data") or {}).get("name"))
    scorer = DigitsScorer(resolution=int(card.sample_shape[-1]))
    runs = [spec for name in models for spec in runs_for(name, "edm_heun", [nfe])]
    rows = compare(models, runs, scorer, samples=samples, repeats=repeats, log=log)
    best = min(zip(sigma_rels, rows), key=lambda pair: pair[1].stat("fd")[0])[0]
    return rows, best
