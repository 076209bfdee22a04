"""What training says while it runs: the loss reaches TensorBoard at least once per epoch whatever log.log_every is,
and each validation is one line (epoch, step, train loss, the selection metric, whether it is a new best)."""

from __future__ import annotations

import re

from conftest import cfg_for
from train_helpers import scalars

from hpcdistill.train import loop


def test_a_run_shorter_than_log_every_still_logs_its_loss_each_epoch(tiny_dataset, tmp_path, capsys):
    short = ("log.log_every=1000", "train.epochs=2", "data.epoch_samples=4", "train.grad_accum=1")
    loop.run(cfg_for(tiny_dataset, tmp_path, "quiet", "baseline", 2.5, *short))
    logged = scalars(tmp_path / "quiet" / "tb", "loss/total")
    assert sorted(logged) == [4, 8]  # each epoch's last step, though 1000 steps were asked between logs
    lines = [line for line in capsys.readouterr().err.splitlines() if re.search(r"epoch \d+/2 step", line)]
    assert len(lines) == 2, lines
    assert re.fullmatch(  # the selection metric by its name, then the accuracies a reader expects
        r"hpcdistill: epoch 1/2 step 4: train loss \d+\.\d{4}, val OvR accuracy \(paper\) \d\.\d{4} \(the "
        r"selection metric; new best\), balanced accuracy \d\.\d{4}, top-1 accuracy \d\.\d{4}",
        lines[0],
    )
