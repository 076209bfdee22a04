"""`--overwrite` removes only what an earlier hpcdistill run wrote in --out, never an input of the command, never
through a link out of --out; `launch` checks SLURM, placeholders and shards before it makes anything; the weak
cases of real files each say their cause in one line. Through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch_helpers import write_experiment
from train_helpers import error_line

from hpcdistill.cli import main
from hpcdistill.synthetic import dataset as synthetic

SHARD = ["--mags", "10,2.5", "--max-size", "96", "--no-progress"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("overwrite") / "slides"
    folder.mkdir()
    for i in range(2):
        synthetic.write_slide(
            folder / f"s{i}.tiff",
            synthetic.SlideSpec(2048, 1536, fmt="tiff", base_mag=40, class_id=i, seed=7 + i, tissues=3),
        )
    return folder


def test_the_qupath_round_trip_into_the_same_folder_keeps_the_edited_outlines(slides, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main.main(["shard", str(slides), "--out", str(out), *SHARD]) == 0
    edited = out / "qc" / "s1.geojson"
    outlines = json.loads(edited.read_text())
    assert len(outlines["features"]) >= 2
    outlines["features"] = outlines["features"][:1]  # the pathologist deletes every tissue but one
    edited.write_text(json.dumps(outlines))
    before = {p.name: p.read_bytes() for p in (out / "qc").glob("*.geojson")}
    argv = ["shard", str(slides), "--out", str(out), *SHARD, "--rois", str(out / "qc")]
    assert main.main(argv) == 2
    assert "different parameters (roi_files" in error_line(capsys)
    assert main.main([*argv, "--overwrite"]) == 0
    assert "kept 2 file(s) that are inputs of this run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "qc").glob("*.geojson")} == before  # the edits survive
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["s1"]["tissues"] == 1 and manifest["slides"]["s0"]["tissues"] >= 2


def test_predict_writes_nothing_through_a_link_out_of_out(slides, tiny_teacher, tmp_path, capsys):
    users = tmp_path / "users-pictures"
    users.mkdir()
    (users / "s0.png").write_bytes(b"a user's own picture")
    out = tmp_path / "p"
    assert main.main(["predict", str(tiny_teacher), str(slides), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    for name in ("overlays",):
        for path in (out / name).iterdir():
            path.unlink()
        (out / name).rmdir()
        (out / name).symlink_to(users)
    assert main.main(["predict", str(tiny_teacher), str(slides), "--out", str(out), "--overwrite"]) == 2
    assert f"{out / 'overlays'}: a symbolic link to {users}, outside --out" in error_line(capsys)
    assert (users / "s0.png").read_bytes() == b"a user's own picture" and (out / "predictions.json").is_file()


def test_a_folder_no_hpcdistill_wrote_is_never_taken_for_a_result(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "test.json").write_text('{"mine": true}')
    argv = ["evaluate", str(tmp_path / "best.pt"), "--out", str(home), "--overwrite"]
    assert main.main(argv) == 2
    assert "holds files no hpcdistill command wrote" in error_line(capsys)
    assert (home / "test.json").read_text() == '{"mine": true}'


def test_an_input_inside_out_is_never_replaced(slides, tiny_teacher, tmp_path, capsys):
    out = tmp_path / "p"
    assert main.main(["predict", str(tiny_teacher), str(slides), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    labels = out / "slides.csv"  # a user gives predict's own output back as its labels
    argv = ["predict", str(tiny_teacher), str(slides), "--out", str(out), "--labels", str(labels), "--overwrite"]
    before = labels.read_bytes()
    assert main.main(argv) == 2
    assert f"{labels}: an input of this command, in --out {out} where it writes slides.csv" in error_line(capsys)
    assert labels.read_bytes() == before


def test_launch_without_slurm_placeholders_or_shards_says_so_and_makes_nothing(tmp_path, monkeypatch, capsys):
    path = write_experiment(tmp_path)
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    assert main.main(["launch", str(path), "--cluster", "slurm"]) == 2
    assert "sbatch and srun: not found on PATH" in error_line(capsys)
    assert not (tmp_path / "runs").exists()  # no half-made experiment folder
    monkeypatch.undo()
    placeholder = write_experiment(tmp_path, name="ph", resources={"default": {"partition": "YOUR_PARTITION"}})
    assert main.main(["launch", str(placeholder), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "partition 'YOUR_PARTITION' is the example's placeholder" in err
    assert f"{tmp_path / 'shards'}: no manifest.json: shard the slides first" in err
    assert main.main(["launch", str(placeholder), "--cluster", "local"]) == 2
    assert "no manifest.json" in error_line(capsys) and not (tmp_path / "runs").exists()


def test_weak_cases_name_their_cause(slides, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\ns0,normal\ns1,celiac\n")
    out = tmp_path / "dry"
    assert main.main(["shard", str(slides), "--out", str(out), *SHARD, "--labels", str(labels), "--dry-run"]) == 0
    assert "no 'patient' column: each slide is its own patient" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main.main(["train", str(empty)]) == 2
    assert f"{empty}: holds no settings" in error_line(capsys)
    from hpcdistill.config.loading import load_config

    assert load_config("configs/demo/teacher.yaml", ["data.mag=3"]).data.mag == 3
    assert "data.mag: not used in teacher mode" in capsys.readouterr().err
