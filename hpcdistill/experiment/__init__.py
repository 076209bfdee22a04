"""The experiment file, its job graph (shard, teacher, methods, evaluation), launching it, and the demo with its
record."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "load_experiment": "experiment_file",
    "Experiment": "experiment_file",
    "plan_jobs": "graph",
    "launch": "launch",
    "run_demo": "demo",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
