"""`EvalOptions`: how an export is scored, one field per `hpcdistill evaluate` flag of the same name. Torch-free, so
the experiment's job graph builds it without loading the evaluation stack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalOptions:
    """What `evaluate_checkpoint` does besides which export and which shards."""

    split: str = "test"
    method: str | None = None  # the report's method name; None: read from the export's config
    study: str = "main"  # which report table the record belongs to (main, or an ablation)
    iterations: int = 10000  # bootstrap resamples
    confidence: float = 0.95  # the bootstrap CIs' coverage
    seed: int = 0  # the bootstrap's
    by_slide: bool = False  # the tissue unit's bootstrap resamples whole slides (default: the paper's, tissues)
    out: str | None = None  # the record's folder; None: eval/ beside the export
    device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:N; fp32 either way
    workers: int = 0  # shard-decoding processes
    units: tuple[str, ...] = ("tissue",)  # --unit, repeatable: tissue, slide and/or patient
    slide_rule: str = "mean"  # how a slide's or patient's windows make its call (scoring.aggregation)
    progress: bool | None = False  # a progress bar: None on a terminal only
