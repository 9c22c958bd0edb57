"""Training metrics of one run of the loop: every validation record to the loggers of
``train.loggers`` (:mod:`elmm_ray.tracking`), and at the end a training-curve PNG (logged
as an artifact). Only rank 0 logs."""

from __future__ import annotations

from pathlib import Path

from elmm_ray.config import Config
from elmm_ray.layout import RunLayout
from elmm_ray.tracking import Tracker, open_tracker


class MetricsLogger:
    """The loggers of the training run writing into ``out``; its metrics go under the
    directory's path in the run (``train``, ``prune/finetune_1``)."""

    def __init__(self, cfg: Config, out: Path, *, enabled: bool = True,
                 resume: bool = False) -> None:
        self.out, self.enabled = Path(out), enabled
        root = RunLayout.of(cfg).root
        self.prefix = (self.out.relative_to(root).as_posix() if self.out.is_relative_to(root)
                       else self.out.name)
        self.tracker = open_tracker(cfg, self.out, resume=resume) if enabled else Tracker([], [])

    def log(self, record: dict) -> None:
        self.tracker.log_record(record, self.prefix)

    def finish(self, history: list[dict], **summary: float) -> None:
        if not self.enabled:
            return
        curve = plot_curves(history, self.out / "training_curve.png")
        if curve is not None:
            self.tracker.log_artifact(curve, self.prefix)
        self.tracker.log_metrics(summary, self.prefix)
        self.tracker.close()


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Loss and validation MRR against steps, as a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(steps, [h["loss"] for h in history], "o-", color="tab:blue", label="loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss", color="tab:blue")
    mrr_ax = loss_ax.twinx()
    mrr_ax.plot(steps, [h["val_mrr"] for h in history], "s-", color="tab:red", label="val MRR")
    mrr_ax.set_ylabel("validation MRR", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
