"""The README's demo section and the quick demo's digest, made from a demo run (`make readme-demo`): README tooling,
not part of the package.

`render_section` writes the demo's results (tables, ordering lines, times, versions) from the run's record
(hpcdistill.experiment.demo_record) and its evaluation records between the README's `<!-- demo:start -->` and
`<!-- demo:end -->` markers, and copies its Figure 3 next to the README, so the README shows one run, whole, and says
what made it. The digest fingerprints the quick demo's numerics; tests/integration/test_demo.py recomputes it.

    python docs/demo_section.py readme runs/demo
    python docs/demo_section.py digest runs/demo-quick/experiment
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

from hpcdistill.common.errors import LaunchError
from hpcdistill.common.files import atomic_write_text
from hpcdistill.common.mags import mag_name
from hpcdistill.experiment.demo_record import machine, read_record, versions
from hpcdistill.shards.manifest import read_manifest

START, END = "<!-- demo:start -->", "<!-- demo:end -->"


def _slide_table(results: list) -> str:
    from hpcdistill.evaluate.report import methods_table
    from hpcdistill.evaluate.report_units import UNIT_METRICS, at_unit

    slides = at_unit(results, "slide")
    title = (
        "**The same at the slide level** (each slide called by the area-weighted mean of its tissues, as `predict` "
        "does; CIs resample slides; AUROC one-vs-rest, macro)"
    )
    return f"{title}\n\n" + (methods_table(slides, metrics=UNIT_METRICS) if slides else "_not evaluated by slide_")


def made_with(m: dict[str, Any], v: dict[str, str]) -> str:
    """The block's last line: Python, the OS, the CPU's vector instruction sets and the pinned versions."""
    isa = f" (CPU vector ISA {m['isa']}: {' '.join(m['isa_flags'])})" if "isa" in m else ""
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    return f"Made with Python {m['python']} on {m['os']}{isa}; {versions} (the versions `constraints.txt` pins)."


def render_section(record: dict[str, Any], figure: str) -> str:
    """The README's demo results from a demo record and its run's evaluation records."""
    from hpcdistill.evaluate.report import load_results, methods_table, teacher_table

    results = load_results([Path(record["tensorboard"])])
    manifest = read_manifest(record["shards"])
    splits = manifest["splits"]
    teacher = next(r for r in results if r.method == "Teacher")
    savings = ", ".join(
        f"{teacher.gflops / r.gflops:.1f}× at {mag_name(r.mag)}"
        for r in sorted({r.mag: r for r in results if r.method == "Baseline"}.values(), key=lambda r: -r.mag)
    )
    phases = ", ".join(
        f"{name} {minutes} min"
        + (" (reused from an earlier run)" if name == "slides and shards" and minutes < 0.1 else "")
        for name, minutes in record["phase_minutes"].items()
    )
    m, v = record["machine"], record["versions"]
    resamples = " / ".join(f"{n:,}" for n in record.get("resamples", [10000]))  # older records: the default
    return "\n".join(
        [
            f"Results of one `make demo` run at commit `{record['commit']}` "
            f"on {m['cpu']} ({m['cores']} cores, no GPU): "
            f"**{record['minutes']} minutes** after `make install` (per phase, where jobs overlap on the cores: "
            f"{phases}). Splits: "
            + ", ".join(f"{name} {e['samples']} tissues ({e['slides']} slides)" for name, e in splits.items())
            + f". Percentages with 95% bootstrap CIs ({resamples} resamples) on the synthetic test split; GFLOPs per "
            f"forward pass at the median tissue size. The students need {savings} fewer FLOPs than the teacher.",
            "",
            "**Teacher (Table 3 layout)**",
            "",
            teacher_table(results) + "\n\n" + "\n".join(f"- {line}" for line in record.get("teachers", [])),
            "",
            "**Baseline and distillation (Table 4 layout)**",
            "",
            methods_table(results),
            "",
            _slide_table(results),
            "",
            "**Does the paper's ordering hold?** (printed by the demo and written into the report)",
            "",
            "\n".join(record["ordering"]),
            "",
            f"![Figure 3 layout: accuracy against GFLOPs, from the same run]({figure})",
            "",
            made_with(m, v),
        ]
    )


def update_readme(out: str | Path, readme: str | Path = "README.md", figure: str = "docs/demo-figure3.png") -> Path:
    """Replace the README's demo section with the one rendered from the run in `out`; copy its Figure 3."""
    out, readme = Path(out), Path(readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise LaunchError(f"{readme}: no {START} ... {END} markers")
    record = read_record(out)
    section = render_section(record, figure)
    shutil.copyfile(record["figure"], readme.parent / figure)
    body = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{section}\n{END}", text, flags=re.S)
    readme.write_text(body)
    return readme


DIGEST_MARK = re.compile(
    r"<!-- quick-demo-digest: (?P<digest>\S+) on (?P<cpu>.+?) \(isa (?P<isa>\S+), kernel (?P<kernel>\S+)\) "
    r"with torch (?P<torch>\S+) -->"
)


def digest_host() -> dict[str, str]:
    """What the digest is bound to: the CPU model, its vector instruction sets, the kernel and torch's version (the
    test compares all but the kernel, which names the host but does not pick the kernels torch runs)."""
    m = machine()
    return {"cpu": m["cpu"], "isa": m["isa"], "kernel": m["kernel"], "torch": versions()["torch"]}


def quick_digest(exp_dir: str | Path) -> str:
    """A fingerprint of a (quick) demo's numerics: every run's predicted probabilities on the test split, rounded to
    4 decimals, in run and sample-key order."""
    import csv
    import hashlib

    exp_dir, digest = Path(exp_dir), hashlib.sha256()
    for path in sorted(Path(exp_dir).glob("*/eval/*_predictions.csv")):
        digest.update(path.relative_to(exp_dir).as_posix().encode())
        with path.open(newline="") as fh:
            for row in sorted(csv.DictReader(fh), key=lambda r: tuple(r.values())):  # tissue, slide, patient files
                names = ",".join(v for k, v in row.items() if not k.startswith("p_"))
                probs = ",".join(f"{float(v):.4f}" for k, v in row.items() if k.startswith("p_"))
                digest.update(f"{names}:{probs}\n".encode())
    return digest.hexdigest()[:16]


def write_quick_digest(exp_dir: str | Path, readme: str | Path = "README.md") -> str:
    """Store the quick demo's digest, with the host (digest_host) it was made on, in the README."""
    h = digest_host()
    host = f"{h['cpu']} (isa {h['isa']}, kernel {h['kernel']}) with torch {h['torch']}"
    mark = f"<!-- quick-demo-digest: {quick_digest(exp_dir)} on {host} -->"
    path = Path(readme)
    text, count = re.subn(r"<!-- quick-demo-digest: .*? -->", lambda _: mark, path.read_text())
    if count != 1:
        raise LaunchError(f"{path}: expected one <!-- quick-demo-digest: ... --> line, found {count}")
    atomic_write_text(path, text)
    return mark


if __name__ == "__main__":
    what, folder = sys.argv[1:3]
    print(update_readme(folder) if what == "readme" else write_quick_digest(folder))
