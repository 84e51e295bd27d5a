"""The run folder's records: results.csv, results.png, TensorBoard scalars, drawn validation predictions."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from dfineseg.loss.terms import PLOTTED_TERMS
from dfineseg.utils.io import atomic_write_bytes

# The loss panels come from the loss terms' table (a term the run did not compute is skipped).
PLOT_KEYS = (
    "train/loss", *(f"train/{name}" for name in PLOTTED_TERMS), "lr/head", "val/mask_f1", "val/box_f1",
    "val/mask_map50_95", "val/box_map50_95",
)


def _output_path(run_dir: Path, outputs: Any, name: str) -> Path:
    """`run_dir / name`, claimed through the run's `OutputFolder` when there is one (never a user's file)."""
    return outputs.claim(name) if outputs is not None else run_dir / name


class ResultsLog:
    """One row per epoch; the whole CSV is rewritten atomically each time (columns may grow).

    `outputs` (a `dfineseg.utils.outputs.OutputFolder` on `run_dir`) vets every file before it is written.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, outputs: Any = None) -> None:
        self.run_dir = run_dir
        self.outputs = outputs
        self.csv_path = run_dir / "results.csv"
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the CSV and PNG carry the same numbers
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(_output_path(run_dir, outputs, "tensorboard")))

    def load_existing(self, up_to_epoch: int) -> None:
        """On resume: keep the rows of epochs already finished (a later crash may have added none)."""
        if not self.csv_path.is_file():
            return
        with self.csv_path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if int(float(row.get("epoch", 0))) <= up_to_epoch:
                    self.rows.append({k: _num(v) for k, v in row.items()})

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [row]
        columns: list[str] = []
        for r in self.rows:
            columns.extend(k for k in r if k not in columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: _fmt(r.get(k)) for k in columns})
        atomic_write_bytes(_output_path(self.run_dir, self.outputs, "results.csv"), buf.getvalue().encode("utf-8"))
        if self.writer is not None:
            step = int(row.get("epoch", len(self.rows)))
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def plot(self) -> Path | None:
        """results.png: the total and main loss terms, the headline metrics and the head lr per epoch.

        Few panels and no tight_layout: matplotlib's layout pass costs seconds per figure on a busy CPU.
        """
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        present = [k for k in PLOT_KEYS if any(isinstance(r.get(k), int | float) for r in self.rows)]
        if not present:
            return None
        cols = min(4, len(present))
        nrows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.4 * nrows), squeeze=False)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.92, wspace=0.3, hspace=0.45)
        for ax, key in zip(axes.flat, present):
            pts = [(r["epoch"], r[key]) for r in self.rows if isinstance(r.get(key), int | float)]
            ax.plot(*zip(*pts), marker=".", linewidth=1.5)
            ax.set_title(key, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        out = _output_path(self.run_dir, self.outputs, "results.png")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        atomic_write_bytes(out, buf.getvalue())
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _num(text: str) -> Any:
    try:
        return float(text) if text not in ("", None) else None
    except ValueError:
        return text


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def prediction_image_name(record: Any) -> str:
    return f"val_pred_{record.image_id}.jpg"


def save_prediction_images(records: list[Any], predictions: list[Any], names: list[str], out_dir: Path,
                           outputs: Any = None) -> list[Path]:
    import cv2

    from dfineseg.data import read_image
    from dfineseg.infer.draw import draw_detections

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec, dets in zip(records, predictions):
        drawn = draw_detections(read_image(rec.file), dets, names)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        if ok:
            path = _output_path(out_dir, outputs, prediction_image_name(rec))
            atomic_write_bytes(path, buf.tobytes())
            paths.append(path)
    return paths
