"""Publishing export artefacts: each is made in a staging folder inside `out`, checked there, then renamed
over the older one, or kept aside under a name that says it failed; and `export_summary.json`, rewritten
whatever happened, with each artefact's status (passed / failed / not-checked / not-run).

Where each artefact lives and where a failed one goes: the registry (`dfineseg.export.formats.ARTEFACTS`).
Nothing is written over a file dfineseg did not write (the ledger of `dfineseg.utils.outputs`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfineseg.export.errors import ParityError
from dfineseg.export.formats import ARTEFACTS, Artefact
from dfineseg.export.parity import ParityReport, report_path
from dfineseg.utils.outputs import LEDGER, OutputFolder

Say = Callable[[str], None]


def artefact_size(path: Path) -> int:
    """Bytes on disk (a folder: its files, reports left out)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.endswith(".json"))
    return path.stat().st_size


# ------------------------------------------------------------------------------------------ artefacts
SUMMARY_NAME = "export_summary.json"


def output_names(keys: list[str]) -> list[str]:
    """Every name an export of `keys` may write in the out folder (checked before any work)."""
    names = [n for k in keys for name in (ARTEFACTS[k].name, ARTEFACTS[k].failed) for n in ARTEFACTS[k].files(name)]
    return [*names, SUMMARY_NAME]


def adopt_legacy_export(folder: OutputFolder) -> list[str]:
    """An export folder an older dfineseg wrote (before ledgers): its export_summary.json lists the artefacts
    it made there. Record those (and the summary) as dfineseg's, so a new export may replace them after its
    checks; anything the summary does not list stays untouchable. Returns what was adopted."""
    path = folder.root / SUMMARY_NAME
    if not path.is_file() or (folder.root / LEDGER).exists():
        return []
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        listed = summary["artefacts"]
        if not summary["weights"]:  # every summary dfineseg wrote names the checkpoint it exported
            return []
        keys = [k for k, entry in listed.items()
                if k in ARTEFACTS and Path(entry["path"]).name == ARTEFACTS[k].name
                and Path(entry["path"]).resolve().parent == folder.root.resolve()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # not a summary dfineseg wrote: nothing is adopted
    names = [n for k in keys for n in ARTEFACTS[k].files(ARTEFACTS[k].name)]
    return folder.adopt_legacy([*names, SUMMARY_NAME])


@dataclass
class ArtefactRecord:
    key: str
    path: Path
    precision: str
    seconds: float
    parity: ParityReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "not-checked"

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "status": self.status,
            "precision": self.precision,
            "export_seconds": round(self.seconds, 3),
            "size_bytes": artefact_size(self.path) if self.path.exists() else 0,
            "parity": None if self.parity is None else {"passed": self.parity.passed, "report": self.parity.to_dict()},
            **self.extra,
        }


class ExportRun:
    """One export's artefacts: made in `stage`, checked there, then promoted over the older one or kept
    aside as failed; and the summary of all of them, written whatever happened."""

    def __init__(self, keys: list[str], folder: OutputFolder, say: Say) -> None:
        self.keys = keys
        self.folder = folder
        self.say = say
        self.stage: Path | None = None
        self.records: dict[str, ArtefactRecord] = {}
        self.results: dict[str, dict[str, Any]] = {k: {"status": "not-run"} for k in keys}
        self.current: str | None = None  # the artefact being made: an error now is its failure

    def staged(self, key: str) -> Path:
        assert self.stage is not None
        return self.stage / ARTEFACTS[key].name

    def start(self, key: str) -> Path:
        self.current = key
        return self.staged(key)

    def _move(self, spec: Artefact, staged: Path, name: str) -> Path:
        target = self.folder.promote(staged, name)
        if spec.sidecar:
            sidecar = staged.with_name(staged.name + ".json")
            if sidecar.exists():
                self.folder.promote(sidecar, name + ".json")
        return target

    def _write_report(self, spec: Artefact, report: ParityReport, path: Path) -> None:
        report.artefact = str(path)
        report.write(path / "parity.json" if spec.folder else self.folder.claim(path.name + ".parity.json"))

    def _drop(self, name: str) -> None:
        """Remove an earlier artefact of ours (the ledger says so) that this run's result supersedes."""
        path = self.folder.root / name
        if not self.folder.owns(name) or not (path.exists() or path.is_symlink()):
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def settle(self, rec: ArtefactRecord) -> Path:
        """A made (and, with parity on, checked) artefact: promote it, or keep it aside and raise ParityError."""
        spec = ARTEFACTS[rec.key]
        report = rec.parity
        passed = report is None or report.passed
        final = self._move(spec, rec.path, spec.name if passed else spec.failed)
        rec.path = final
        rec.status = "not-checked" if report is None else "passed" if passed else "failed"
        if report is not None:
            self._write_report(spec, report, final)
        if passed:
            for name in spec.files(spec.failed):  # an older failure of this artefact is no longer news
                self._drop(name)
        self.records[rec.key] = rec
        self.results[rec.key] = {"status": rec.status, "path": str(final)}
        self.current = None
        if not passed:
            assert report is not None
            lines = "\n  ".join(c.describe() for c in report.failures())
            older = self.folder.root / spec.name
            kept = f"the earlier {older} is unchanged" if older.exists() else f"nothing was written at {older}"
            raise ParityError(
                f"{final}: parity with PyTorch failed ({rec.precision}; report {report_path(final)}); kept aside "
                f"under that name, {kept}:\n  {lines}"
            )
        self.say(f"  {rec.key}: {rec.status} -> {final}")
        return final

    def fail_current(self, exc: BaseException) -> None:
        """An error while `current` was being made: it failed; what it left is kept aside as failed."""
        key, self.current = self.current, None
        if key is None:
            return
        entry: dict[str, Any] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        staged = self.staged(key) if self.stage is not None else None
        if staged is not None and (staged.exists() or staged.is_symlink()):
            try:
                entry["path"] = str(self._move(ARTEFACTS[key], staged, ARTEFACTS[key].failed))
            except Exception as move_exc:  # noqa: BLE001 - the original error is the one to report
                entry["kept_aside_error"] = str(move_exc)
        self.results[key] = entry

    def summary(self, base: dict[str, Any], error: BaseException | None) -> dict[str, Any]:
        failed = [k for k, r in self.results.items() if r["status"] == "failed"]
        results = {}
        for key, entry in self.results.items():
            entry = dict(entry)
            if entry["status"] == "not-run":
                entry["reason"] = (
                    f"not made: {failed[0]} failed first" if failed
                    else f"not made: the export stopped ({type(error).__name__})" if error else "not made"
                )
            results[key] = entry
        statuses = {r["status"] for r in results.values()}
        status = "failed" if error is not None or "failed" in statuses else (
            "passed" if statuses <= {"passed"} else "not-checked")
        earlier = self._earlier()
        return {
            "status": status,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            **base,
            "results": results,
            "artefacts": {k: r.summary() for k, r in self.records.items()},
            **({"earlier_artefacts": earlier} if earlier else {}),
        }

    def _earlier(self) -> dict[str, Any]:
        """Artefacts of earlier exports into this folder that this one did not replace (not asked for, failed
        or not run this time) and that are still on disk, as the earlier summary described them."""
        path = self.folder.root / SUMMARY_NAME
        if not self.folder.owns(SUMMARY_NAME) or not path.is_file():
            return {}
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            sources = [old.get("artefacts") or {}, old.get("earlier_artefacts") or {}]  # newest first
        except (ValueError, OSError, AttributeError):
            return {}
        earlier: dict[str, Any] = {}
        for entries in sources:
            for key, entry in entries.items():
                if key in earlier or key not in ARTEFACTS or not isinstance(entry, dict) or not entry.get("path"):
                    continue
                if self.results.get(key, {}).get("status") in ("passed", "not-checked"):
                    continue  # replaced by this run
                if Path(entry["path"]).name == ARTEFACTS[key].name and Path(entry["path"]).exists():
                    earlier[key] = entry
        return earlier

    def write_summary(self, base: dict[str, Any], error: BaseException | None) -> Path:
        data = json.dumps(self.summary(base, error), indent=2, default=str)
        return self.folder.write_text(SUMMARY_NAME, data)
