"""The experiment file: one YAML naming the teacher, the methods (one SLURM array each over the magnifications),
evaluation and per-job-kind resources. Parsed with common/typed_tree.py's builder, so a typo is the same one-line
"key: unknown key (did you mean ...?)" error as in training configs. Input paths (configs, shards) resolve against
the working directory, then the experiment file's folder, then the repository (and the configs installed with the
package); the output folder `out_dir` always against the working directory, so outputs land where the user is. All
are made absolute at load, so jobs do not depend on where SLURM starts them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpcdistill.cluster.job_plan import Resources, check_resources
from hpcdistill.common.errors import ConfigError, HpcdistillError, LaunchError
from hpcdistill.common.mags import parse_mag
from hpcdistill.common.typed_tree import build_dataclass, merge_dicts, read_yaml, short
from hpcdistill.config.schema import REPO_ROOT, resolve_path

RESERVED_KINDS = ("default", "teacher", "evaluate", "shard", "predict", "merge")  # job kinds that are not methods


@dataclass
class JobSpec:
    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class MethodSpec:
    config: str = ""
    label: str = ""  # the method name in the report ("Baseline", "KD", "KD (ADv1)"); default: the method key
    overrides: list[str] = field(default_factory=list)
    init_from: str = ""  # another method whose best.pt at the same magnification initialises this one (finetune)
    # Another method (e.g. baseline) whose best.pt at the same magnification and seed this distillation's teacher must
    # beat on validation (teacher.reference): the array then waits for that method.
    gate_against: str = ""
    study: Literal["main", "ablation"] = "main"


@dataclass
class EvaluateSpec:
    enabled: bool = True
    split: str = "test"
    iterations: int = 10000
    units: list[Literal["tissue", "slide", "patient"]] = field(default_factory=lambda: ["tissue", "slide", "patient"])
    slide_rule: Literal["mean", "max"] = "mean"  # how slides and patients are called from their tissues


@dataclass
class ShardStage:
    """Shard the slides first, into the experiment's `shards` folder, as an array of `tasks` (then a merge job)."""

    slides: list[str] = field(default_factory=list)  # slide files, folders or globs
    labels: str = ""  # labels CSV (slide, patient, label, split); "" = every slide unlabeled (aux)
    classes: list[str] = field(default_factory=list)  # class order; [] = sorted labels
    mags: list[float] = field(default_factory=list)  # [] = the teacher's and the experiment's magnifications
    tasks: int = 1
    workers: int = 1  # processes inside each task
    max_size: int = 8192  # 10x px; larger tissues are cut into aligned windows
    seed: int = 0
    strict: bool = False  # any skipped slide fails the merge


@dataclass
class Experiment:
    name: str = ""
    out_dir: str = "runs"
    shards: str = ""
    mags: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # [] = one run per task with the config's run.seed
    teacher: JobSpec = field(default_factory=JobSpec)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    resources: dict[str, Resources] = field(default_factory=dict)  # "default", "teacher", <method>, "evaluate", ...
    shard: ShardStage | None = None  # optional first stage: slides -> `shards`
    path: str = ""  # the experiment file (set by the loader)

    @property
    def exp_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def resources_for(self, kind: str) -> Resources:
        return self.resources.get(kind) or self.resources["default"]


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML (it may inherit another by `base:`); errors are one line: file and key."""
    path = Path(path) if Path(path).exists() else resolve_path(str(path))  # configs/... found as `train` finds them
    try:
        raw = read_yaml(path, ())  # typed_tree's reader: safe_load, one-line errors, `base:` inheritance
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    try:
        return _experiment_from_dict(raw, path)
    except ConfigError as err:
        raise LaunchError(f"{path}: {err}") from None


def _experiment_from_dict(raw: dict[str, Any], path: Path) -> Experiment:
    raw = dict(raw)
    methods_raw = raw.pop("methods", None)
    resources_raw = raw.pop("resources", None) or {}
    mags_raw = raw.pop("mags", None)
    if "path" in raw:
        raise ConfigError("path: unknown key")
    exp: Experiment = build_dataclass(Experiment, raw, "")  # scalar fields, teacher, evaluate
    for key in ("name", "shards"):
        if not getattr(exp, key):
            raise ConfigError(f"{key}: required")
    if not exp.teacher.config:
        raise ConfigError("teacher.config: required (the teacher's training config)")
    exp.mags = _parse_mags(mags_raw)
    exp.methods = _parse_methods({} if methods_raw is None else methods_raw)  # a teacher-only experiment is allowed
    exp.resources = _parse_resources(resources_raw, list(exp.methods))
    if len(set(exp.seeds)) != len(exp.seeds):
        raise ConfigError(f"seeds: repeated seed in {exp.seeds}")
    if exp.evaluate.iterations < 1:
        raise ConfigError(f"evaluate.iterations: must be >= 1, got {exp.evaluate.iterations}")
    base = path.parent
    exp.path = str(path.resolve())
    exp.out_dir = str((Path.cwd() / Path(exp.out_dir).expanduser()).resolve())  # an output: where the user is
    exp.shards = str(_locate(exp.shards, base, must_exist=False))
    exp.teacher.config = str(_locate(exp.teacher.config, base, key="teacher.config"))
    if exp.shard is not None:
        _check_shard_stage(exp.shard, base)
    for name, method in exp.methods.items():
        method.config = str(_locate(method.config, base, key=f"methods.{name}.config"))
    return exp


def _check_shard_stage(stage: ShardStage, base: Path) -> None:
    if not stage.slides:
        raise ConfigError("shard.slides: required, slide files, folders or globs")
    if stage.tasks < 1 or stage.workers < 1:
        raise ConfigError("shard.tasks / shard.workers: must be >= 1")
    stage.slides = [
        entry if any(c in entry for c in "*?[") else str(_locate(entry, base, key="shard.slides"))
        for entry in stage.slides
    ]
    if stage.labels:
        stage.labels = str(_locate(stage.labels, base, key="shard.labels"))


def _parse_mags(mags_raw: Any) -> list[float]:
    if not isinstance(mags_raw, list) or not mags_raw:
        raise ConfigError("mags: required, a list of magnifications like [5, 2.5]")
    try:
        mags = [parse_mag(m) for m in mags_raw]
    except HpcdistillError as err:
        raise ConfigError(f"mags: {err}") from None
    if len(set(mags)) != len(mags):
        raise ConfigError(f"mags: repeated magnification in {mags_raw}")
    return mags


def _parse_methods(methods_raw: Any) -> dict[str, MethodSpec]:
    if not isinstance(methods_raw, dict):
        raise ConfigError("methods: expected a mapping like {baseline: {config: ..., label: Baseline}}")
    methods: dict[str, MethodSpec] = {}
    for name, spec in methods_raw.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"methods.{name}: method names are letters, digits, '_' or '-'")
        if name in RESERVED_KINDS:
            raise ConfigError(f"methods.{name}: reserved name (used for job kinds)")
        method: MethodSpec = build_dataclass(MethodSpec, spec, f"methods.{name}.")
        if not method.config:
            raise ConfigError(f"methods.{name}.config: required")
        method.label = method.label or name
        methods[name] = method
    for name, method in methods.items():
        for key in ("init_from", "gate_against"):
            _check_method_link(methods, name, key, getattr(method, key))
    return methods


def _check_method_link(methods: dict[str, MethodSpec], name: str, key: str, other: str) -> None:
    """init_from and gate_against name another method that itself waits on none (one level: the graph stays flat)."""
    if not other:
        return
    if other not in methods:
        raise ConfigError(f"methods.{name}.{key}: {other!r} is not a method (have {', '.join(methods)})")
    if other == name:
        raise ConfigError(f"methods.{name}.{key}: a method cannot name itself")
    if methods[other].init_from or methods[other].gate_against:
        raise ConfigError(f"methods.{name}.{key}: {other} itself waits on another method; one level only")


def _parse_resources(raw: Any, methods: list[str]) -> dict[str, Resources]:
    if not isinstance(raw, dict):
        raise ConfigError(f"resources: expected a mapping of job kinds, got {short(raw)}")
    kinds = [*RESERVED_KINDS, *methods]
    default_raw = raw.get("default") or {}
    out: dict[str, Resources] = {}
    for kind, part in raw.items():
        if kind not in kinds:
            raise ConfigError(f"resources.{kind}: unknown job kind (known: {', '.join(kinds)})")
        if part is not None and not isinstance(part, dict):
            raise ConfigError(f"resources.{kind}: expected a mapping, got {short(part)}")
    for kind in kinds:
        if kind != "default" and kind not in raw:
            continue
        merged = merge_dicts(default_raw, raw.get(kind) or {}) if kind != "default" else dict(default_raw)
        out[kind] = resources_from_mapping(merged, f"resources.{kind}.")
    return out


def resources_from_mapping(merged: dict[str, Any], prefix: str) -> Resources:
    """One job kind's Resources from its merged mapping, every key typed and checked (errors name `prefix`key)."""
    merged = dict(merged)
    sbatch = merged.pop("sbatch", None) or {}
    res: Resources = build_dataclass(Resources, merged, prefix)
    if not isinstance(sbatch, dict) or any(isinstance(v, (dict, list)) for v in sbatch.values()):
        raise ConfigError(f"{prefix}sbatch: expected a mapping of sbatch options to values, got {short(sbatch)}")
    res.sbatch = dict(sbatch)
    check_resources(res, prefix)
    return res


def resources_block(path: str | Path, kind: str) -> dict[str, Any]:
    """What `shard|predict --cluster --resources FILE` reads: an experiment file's resources.<kind> over its
    resources.default (the same block `launch` uses), or a file holding one block of those keys."""
    try:
        raw = read_yaml(Path(path), ())
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    if "resources" not in raw:
        return dict(raw)
    block = raw["resources"] or {}
    if not isinstance(block, dict):
        raise LaunchError(f"{path}: resources: expected a mapping of job kinds, got {short(block)}")
    return merge_dicts(block.get("default") or {}, block.get(kind) or {})


def _locate(path: str, base: Path, *, must_exist: bool = True, key: str = "") -> Path:
    """As given (cwd), else next to the experiment file, else in the repository; absolute."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, base / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    if must_exist:
        raise ConfigError(f"{key}: {path}: no such file (looked in {', '.join(str(c.parent) for c in candidates)})")
    return candidates[0].resolve()
