"""The run folder: picking runs/NAME (NAME2, NAME3 ...), vetting every file the trainer writes there through
the output ledger (`dfineseg.utils.outputs.OutputFolder`) with the trainer's messages, adopting folders
written before ledgers existed, and removing temp files an interrupted save left behind."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from dfineseg.train import distributed as D
from dfineseg.train.results import prediction_image_name
from dfineseg.utils.outputs import LEDGER, OutputConflictError, OutputFolder

# Temp files of atomic writes (dfineseg.utils.io: mkstemp prefix ".{name}." suffix ".tmp") of the files the
# trainer writes; a kill -9 in the middle of a save leaves one behind.
_STALE_TEMP = re.compile(
    r"^\.(last\.pt|best\.pt|config\.yaml|results\.csv|results\.png|val_pred_\d+\.jpg)\.[a-z0-9_]{8}\.tmp$"
)


def increment_run_dir(project: str | Path, name: str, exist_ok: bool) -> Path:
    """runs/exp, then runs/exp2, runs/exp3 ... unless exist_ok reuses the folder."""
    base = Path(project) / name
    if exist_ok or not base.exists():
        return base
    n = 2
    while (Path(project) / f"{name}{n}").exists():
        n += 1
    return Path(project) / f"{name}{n}"


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files an interrupted checkpoint/result save left in `run_dir` (exact pattern only)."""
    removed = []
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if _STALE_TEMP.match(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def written_by_an_older_dfineseg(run_dir: Path, resuming: bool) -> bool:
    """A run folder without a ledger that an earlier dfineseg (before ledgers) wrote: the resume checkpoint
    just loaded lives in it, or its config.yaml is one dfineseg wrote (it opens with `schema_version:`)."""
    if (run_dir / LEDGER).exists():
        return False
    if resuming:
        return True
    try:
        with open(run_dir / "config.yaml", encoding="utf-8") as fh:
            return fh.readline().startswith("schema_version:")
    except (OSError, UnicodeDecodeError):
        return False


def adopt_legacy_run_folder(run_dir: Path, resuming: bool, protect: list[str | Path]) -> list[str]:
    """Record the trainer's own files of a run folder an older dfineseg wrote, so this run may update them
    (`make demo` again after an upgrade, or a resume). Folders with a ledger, or without that evidence,
    are left as they are: their files stay untouchable."""
    if not written_by_an_older_dfineseg(run_dir, resuming):
        return []
    own = ["config.yaml", "results.csv", "results.png", "last.pt", "best.pt", "val", "tensorboard"]
    own += sorted(p.name for p in run_dir.glob("val_pred_*.jpg"))
    return OutputFolder(run_dir, command="train", protect=protect).adopt_legacy(own)


class RunFolder:
    """The run's folder `path` and its `outputs` (OutputFolder); `check(rel)` / `claim(rel)` raise an
    OutputConflictError that says what to do in training terms."""

    def __init__(self, path: Path, protect: list[str | Path]) -> None:
        self.path = path
        try:
            self.outputs = OutputFolder(path, command="train", protect=protect)
        except OutputConflictError as exc:
            raise OutputConflictError(f"{exc} (train: the run folder is project/name, here {path})") from None

    @classmethod
    def open(cls, cfg: Any, train_index: Any, val_index: Any, resuming: bool, is_main: bool) -> RunFolder:
        """Pick the run folder and vet it before any work: every file the trainer will write there must be
        new or written by dfineseg before (`OutputFolder`'s ledger), and the run's inputs (dataset files,
        start weights, a resume file not named last.pt) are never written."""
        tcfg = cfg.train
        if resuming:
            run_dir = Path(tcfg.resume).resolve().parent
        else:
            # Rank 0 picks the folder (runs/exp2 ...) so every rank names the same one.
            run_dir = Path(D.broadcast_object(str(increment_run_dir(tcfg.project, tcfg.name, tcfg.exist_ok).resolve())))
        protect: list[str | Path] = [cfg.data.path]
        for index in (train_index, val_index):
            folders = {Path(rec.file).parent for rec in index.images}
            if index.format == "yolo":
                from dfineseg.data.yolo import label_path_for

                folders |= {label_path_for(Path(rec.file)).parent for rec in index.images}
            protect += sorted(folders)
        for start in (cfg.model.weights, cfg.model.backbone_weights):
            if start:
                protect.append(start)
        if tcfg.resume and Path(tcfg.resume).name != "last.pt":
            protect.append(tcfg.resume)
        if is_main and run_dir.is_dir():
            adopted = adopt_legacy_run_folder(run_dir, resuming, protect)
            if adopted:
                print(f"{run_dir}: written by an earlier dfineseg (no output ledger); its own files are adopted: "
                      + ", ".join(adopted), file=sys.stderr)
        D.barrier()  # every rank reads the ledger after rank 0 adopted
        folder = cls(run_dir, protect)
        names = ["config.yaml", "results.csv", "results.png", "last.pt", "best.pt", "val"]
        if tcfg.tensorboard:
            names.append("tensorboard")
        names += [prediction_image_name(rec) for rec in val_index.images[: tcfg.plot_images]]
        for name in names:
            folder.check(name)
        if is_main:
            removed = remove_stale_temp_files(run_dir)
            if removed:
                print(f"removed {len(removed)} temp file(s) left in {run_dir} by an interrupted save: "
                      + ", ".join(p.name for p in removed), file=sys.stderr)
        return folder

    def _conflict(self, exc: OutputConflictError, rel: str) -> OutputConflictError:
        path = self.path / rel
        if (path.exists() or path.is_symlink()) and not self.outputs.owns(rel):
            return OutputConflictError(
                f"train: {path} already exists and was not written by dfineseg, so it is left untouched; train "
                "into another folder (name=NEW or project=DIR; without exist_ok=true a new folder name2, name3 ... "
                "is picked) or move that file away"
            )
        return OutputConflictError(
            f"train: {path} is one of this run's inputs (dataset files, model.weights or the resume file) and is "
            "never written; choose a run folder outside them with project= / name="
        )

    def check(self, rel: str) -> Path:
        """run_dir/rel if the trainer may write it, else the trainer's OutputConflictError; records nothing."""
        try:
            return self.outputs.check(rel)
        except OutputConflictError as exc:
            raise self._conflict(exc, rel) from None

    def claim(self, rel: str) -> Path:
        """`check`, then record run_dir/rel in the ledger as dfineseg's (its folder created); the path to write."""
        try:
            return self.outputs.claim(rel)
        except OutputConflictError as exc:
            raise self._conflict(exc, rel) from None
