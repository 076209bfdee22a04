"""`predict --dry-run` without a cluster: what prediction would read on each slide (its base magnification, the
tissues and windows at the model's magnification, the pyramid level read), found by the same code as prediction,
with nothing classified and nothing written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcdistill.common.errors import PredictionError, one_line
from hpcdistill.common.mags import mag_name
from hpcdistill.models.export import load_exported
from hpcdistill.predict.options import PredictOptions, check_options, slide_scale
from hpcdistill.predict.prediction import prediction_windows, read_record
from hpcdistill.slides.catalog import check_slide_ids, slide_name
from hpcdistill.slides.factory import open_slide


def preview_slides(model_path: str | Path, slides: list[Path], options: PredictOptions) -> list[dict[str, Any]]:
    """One row per slide: what would be classified, or why the slide would be skipped."""
    exported = load_exported(model_path)
    options = check_options(options, exported)
    check_slide_ids(slides)
    rows = []
    for path in slides:
        row: dict[str, Any] = {"slide": slide_name(Path(path)), "path": str(path), "status": "ok"}
        try:
            with open_slide(path, base_mag=options.base_mag, scale=slide_scale(options, exported)) as slide:
                info = slide.info
                if info.base_mag < exported.mag:
                    raise PredictionError(f"scanned at {mag_name(info.base_mag)}, below {mag_name(exported.mag)}")
                found, small = prediction_windows(slide, path, exported, options)
                row |= {
                    "base_mag": info.base_mag,
                    "mag_source": info.mag_source,
                    "tissues": len(found.boxes),
                    "windows": found.count,
                    "note": small,
                }
                row |= read_record(slide, exported.mag, options.read or exported.source)
        except Exception as err:  # noqa: BLE001 -- as prediction: one slide's fault is its row
            row |= {"status": "skipped", "reason": one_line(err)}
        rows.append(row)
    return rows


def preview_lines(rows: list[dict[str, Any]], mag: float | None = None) -> list[str]:
    """The plan as printed: a line per slide and the totals."""
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['slide']}: would be skipped: {row['reason']}")
            continue
        where = f"level {row['level']} ({mag_name(row['level_mag'])}, {row['read']})"
        note = f"; {row['note']}" if row.get("note") else ""
        lines.append(f"{row['slide']}: {row['tissues']} tissues, {row['windows']} windows, read from {where}{note}")
    ok = [r for r in rows if r["status"] == "ok"]
    lines.append(
        f"{len(ok)}/{len(rows)} slides would be classified ({sum(r['windows'] for r in ok)} windows); "
        "nothing classified or written (--dry-run)"
    )
    return lines
