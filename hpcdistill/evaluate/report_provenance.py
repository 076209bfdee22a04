"""The report's "How these results were made": the versions, commit and host each model and each evaluation was
made with (from their provenance records), one line where they disagree, and the report's own record."""

from __future__ import annotations

from typing import Any

from hpcdistill.common.provenance import describe_provenance, provenance


def _made_with(results: list[Any]) -> dict[str, list[str]]:
    """{what it was made with: the runs made with it}, over every model and every evaluation that has a record."""
    out: dict[str, list[str]] = {}
    for r in results:
        for what, record in (("model", r.model_provenance), ("evaluation", r.provenance)):
            if record:
                out.setdefault(describe_provenance(record), []).append(f"{r.method} @ {r.mag:g}x ({what})")
    return out


def provenance_warning(results: list[Any]) -> str | None:
    """One line when the runs were made with more than one version of the package, its commit or its libraries."""
    made = _made_with(results)
    if len(made) < 2:
        return None
    return (
        f"the reported runs were made with {len(made)} different versions ({'; '.join(sorted(made))}): numbers from "
        "different code or libraries are compared side by side (see the report's How these results were made)"
    )


def provenance_section(results: list[Any]) -> list[str]:
    """The section's heading and body: each distinct record with the runs made with it, a warning where they
    disagree, the runs without a record, and the report's own."""
    made = _made_with(results)
    lines = [f"- {what}: {', '.join(runs)}" for what, runs in sorted(made.items())]
    bare = [f"{r.method} @ {r.mag:g}x" for r in results if not r.provenance and not r.model_provenance]
    if bare:
        lines.append(f"- no record (evaluated by an older version): {', '.join(bare)}")
    warning = provenance_warning(results)
    own: dict[str, Any] = provenance()
    slurm = f", SLURM job {own['slurm'].get('job')}" if own.get("slurm") else ""
    lines += [
        *([f"\n**Warning:** {warning}."] if warning else []),
        f"\nThis report: {describe_provenance(own)}, on {own['host']}{slurm}, at {own['time']}; "
        f"command `{' '.join(own['command'])}`.",
    ]
    return ["## How these results were made", "\n".join(lines)]
