"""Training: the loop and its state, the run folder and checkpoints, resume checks, validation and export selection,
the weight average, the stop on a non-finite loss, the process group, the DeepSpeed config, the losses, the budget
and its schedule, the teacher gate and the training job."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "run": "loop",
    "main_train": "loop",
    "soft_loss": "losses",
    "pixel_loss": "losses",
    "distill_loss": "losses",
    "RunFolder": "run_folder",
    "complete_checkpoints": "run_folder",
    "build_ds_config": "ds_config",
    "TrainTask": "task",
    "budget_line": "budget",
    "stop_reason": "budget",
    "check_teacher": "teacher_gate",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
