"""Training metrics: ``metrics.jsonl``, TensorBoard, MLflow (when a URI is set) and a
training-curve PNG at the end. Only rank 0 logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends records to ``<out>/metrics.jsonl`` and mirrors them to TensorBoard/MLflow."""

    def __init__(self, out: Path, mlflow_uri: str = "", *, enabled: bool = True,
                 resume: bool = False) -> None:
        self.out, self.enabled = Path(out), enabled
        self.writer = None
        self.mlflow = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            log.warning("tensorboard unavailable; logging to metrics.jsonl only")
        if mlflow_uri:
            try:
                import mlflow
            except ImportError as err:
                raise RuntimeError("`train.mlflow_uri` is set but mlflow is not installed; "
                                   "`pip install mlflow` or leave the key empty") from err
            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.start_run(run_name=self.out.parent.name)
            self.mlflow = mlflow

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=record["step"])

    def finish(self, history: list[dict], **summary: float) -> None:
        if not self.enabled:
            return
        plot_curves(history, self.out / "training_curve.png")
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in summary.items()})
            self.mlflow.end_run()


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
