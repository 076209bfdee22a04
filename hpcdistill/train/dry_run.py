"""`train --dry-run`: what a run would do, read and checked without training or writing anything: the resolved
config (every key, as config.yaml would hold it), the budget line from the shards' manifest, and the run folder with
what the run would do there (start, resume from a checkpoint, start over, or be refused)."""

from __future__ import annotations

import yaml

from hpcdistill.config.loading import load_config
from hpcdistill.train.data_plan import plan_data
from hpcdistill.train.run_folder import RunFolder


def folder_plan(folder: RunFolder, resume: str) -> str:
    """What the run would do with its folder, in words (a refusal is raised, as the run would raise it)."""
    if resume == "overwrite":
        earlier = folder.earlier_outputs()
        return "start over" + (f", removing the earlier run's {', '.join(earlier)}" if earlier else "")
    target = folder.resume_target(resume)
    return f"resume from {target}" if target is not None else "start"


def dry_run(config: str, overrides: list[str]) -> str:
    """The text `train --dry-run` prints; a config or data problem is raised as the run would raise it."""
    cfg = load_config(config, overrides)
    plan = plan_data(cfg, world=1)
    return "\n".join(
        [
            yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
            "",
            plan.budget + " (one rank; several divide the samples)",
            f"run folder: {cfg.run_dir} ({folder_plan(RunFolder(cfg.run_dir), cfg.run.resume)})",
            "dry run: nothing trained or written",
        ]
    )
