"""Output folders that never overwrite a file dfineseg did not write.

Every command's `out=` may be an existing folder and may be re-run over its own earlier output, but a file
that is already there and was not written by dfineseg (a source image, a ground-truth label, a user's own
file) is never replaced. dfineseg knows what it wrote from a ledger in the output folder: one relative path
per line, appended (and flushed) before each file is written, so a killed run still owns what it began.

The ledger is a plain append-only text file rather than JSON: a folder of 100,000 inferred images appends
100,000 short lines instead of rewriting a growing document each time.

Artefacts that must pass a check before they replace an older one (exports) are made in a staging folder
inside the output folder (`staging()`, created exclusively, so it can never be a user's) and moved into
place with `promote()`: one rename for a file, rename-aside / rename-in / remove-old for a folder.

Torch-free and pydantic-free: the edge install's `dfineseg infer` uses it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from dfineseg.infer.errors import UserError

LEDGER = ".dfineseg-outputs"


_STAGING_PREFIX = ".dfineseg-staging-"
_STAGING_NAME = re.compile(r"^\.dfineseg-staging-[a-z_]+-(\d+)-[A-Za-z0-9_]+$")  # command, pid, mkdtemp suffix


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: keep every staging folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class OutputConflictError(UserError):
    """An output would replace a file dfineseg did not write, or `out=` is not a usable folder."""


def _key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


class OutputFolder:
    """An output folder plus the ledger of the files dfineseg wrote in it.

    `claim(relpath)` returns the path to write: fine when nothing is there or dfineseg wrote it before;
    an `OutputConflictError` naming the file and the fix otherwise. `protect` names inputs (a weights file,
    the source images' folder) that must never be written, ledger or not: a folder protects everything
    under it.
    """

    def __init__(self, root: str | Path, *, command: str, protect: Iterable[str | Path | None] = ()) -> None:
        self.root = Path(root).expanduser()
        self.command = command
        if self.root.exists() and not self.root.is_dir():
            raise OutputConflictError(
                f"{command}: out={self.root} is an existing file, not a folder; pass out= a folder "
                "(it is created if missing)"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputConflictError(
                f"{command}: cannot create the output folder {self.root}: {exc.strerror or exc}; "
                "pass out= a folder you can write to"
            ) from None
        self._probe_writable()
        # Files are compared by key (a set: a glob source can protect 100,000 files), folders by prefix.
        self._protected_files: set[str] = set()
        self._protected_dirs: list[str] = []
        for p in protect:
            if p is None or str(p) == "":
                continue
            path = Path(p).expanduser()
            if path.is_dir():
                self._protected_dirs.append(_key(path).rstrip(os.sep) + os.sep)
                self._protected_files.add(_key(path))
            else:
                self._protected_files.add(_key(path))
        self._ledger_path = self.root / LEDGER
        self._owned: set[str] = set()
        if self._ledger_path.is_file():
            text = self._ledger_path.read_text(encoding="utf-8", errors="replace")
            self._owned = {line for line in text.splitlines() if line}

    def _probe_writable(self) -> None:
        # os.access says yes to root even on a read-only mount or /sys: only a real file says for sure.
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".dfineseg-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputConflictError(
                f"{self.command}: the output folder {self.root} is not writable ({exc.strerror or exc}); "
                "pass out= a folder you can write to"
            ) from None

    def os_error(self, exc: OSError, path: str | Path | None = None) -> OutputConflictError:
        """A write that failed (read-only folder, disk full) as one clear message naming the file."""
        where = path or exc.filename or self.root
        return OutputConflictError(
            f"{self.command}: cannot write {where}: {exc.strerror or exc}; pass out= a folder you can write to "
            "(and check the free disk space)"
        )

    def owns(self, relpath: str | Path) -> bool:
        return Path(relpath).as_posix() in self._owned

    def is_protected(self, path: str | Path) -> bool:
        key = _key(Path(path))
        return key in self._protected_files or any(key.startswith(d) for d in self._protected_dirs)

    def check(self, relpath: str | Path) -> Path:
        """The path `relpath` would be written at, or an `OutputConflictError`; records nothing."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"output paths are relative to the output folder: {relpath}")
        path = self.root / rel
        if self.is_protected(path):
            raise OutputConflictError(
                f"{self.command}: {path} is one of this command's inputs; dfineseg never writes over its "
                f"inputs: pass out= a folder outside them (e.g. out=runs/{self.command})"
            )
        if (path.exists() or path.is_symlink()) and not self.owns(rel):
            raise OutputConflictError(
                f"{self.command}: {path} already exists and was not written by dfineseg, so it is left "
                f"untouched: pass out= a new or empty folder (e.g. out=runs/{self.command}2), or move that "
                "file away"
            )
        return path

    def claim(self, relpath: str | Path) -> Path:
        """Check `relpath`, record it in the ledger, create its folder; returns the path to write."""
        path = self.check(relpath)
        rel = Path(relpath).as_posix()
        try:
            if rel not in self._owned:
                with open(self._ledger_path, "a", encoding="utf-8") as ledger:
                    ledger.write(rel + "\n")
                    ledger.flush()
                self._owned.add(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.os_error(exc) from None
        return path

    def adopt_legacy(self, relpaths: Iterable[str | Path]) -> list[str]:
        """Record files an older dfineseg (before ledgers existed) wrote here, when the caller holds evidence
        of that (the folder's own checkpoint config or export summary). Only in a folder without a ledger;
        returns what it recorded."""
        if self._ledger_path.exists():
            return []
        present = [Path(r).as_posix() for r in relpaths if (self.root / r).exists() and not self.is_protected(self.root / r)]
        if present:
            try:
                with open(self._ledger_path, "a", encoding="utf-8") as ledger:
                    ledger.write("".join(rel + "\n" for rel in present))
            except OSError as exc:
                raise self.os_error(exc) from None
            self._owned.update(present)
        return present

    def check_all(self, relpaths: Iterable[str | Path]) -> None:
        """Refuse before any work starts when one of the files a command will write is not ours to replace."""
        for rel in relpaths:
            self.check(rel)

    # ------------------------------------------------------------------------------ whole files
    def write_bytes(self, relpath: str | Path, data: bytes) -> Path:
        """Claim `relpath` and write `data` there atomically (a temp file in the same folder, renamed)."""
        from dfineseg.utils.io import atomic_write_bytes

        path = self.claim(relpath)
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise self.os_error(exc, path) from None
        return path

    def write_text(self, relpath: str | Path, text: str) -> Path:
        return self.write_bytes(relpath, text.encode("utf-8"))

    # ------------------------------------------------------------------------------ staged artefacts
    def staging(self) -> Path:
        """A new, hidden folder inside the output folder (same filesystem: promotion is a rename).

        Its name carries this process's id, so staging folders a killed run left behind (their process is
        gone) are removed here, and a concurrent run's (its process alive) are left alone."""
        self._remove_stale_staging()
        try:
            return Path(tempfile.mkdtemp(dir=self.root, prefix=f"{_STAGING_PREFIX}{self.command}-{os.getpid()}-"))
        except OSError as exc:
            raise self.os_error(exc) from None

    def _remove_stale_staging(self) -> None:
        for entry in self.root.glob(f"{_STAGING_PREFIX}*"):
            match = _STAGING_NAME.match(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink():
                continue
            if not _process_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)

    def promote(self, staged: str | Path, relpath: str | Path) -> Path:
        """Move the checked file or folder `staged` to `relpath`, replacing dfineseg's older one there.

        A file is renamed over the old one (atomic). A folder cannot be renamed over a non-empty one: the old
        folder is renamed aside first, the new one renamed in, then the old one removed (put back when the
        second rename fails), so at every moment one complete artefact is at `relpath`, or briefly none.
        """
        staged = Path(staged)
        target = self.claim(relpath)
        try:
            if staged.is_dir() or target.is_dir():
                aside = None
                if target.exists() or target.is_symlink():
                    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                    os.rename(target, aside)
                try:
                    os.rename(staged, target)
                except OSError:
                    if aside is not None:
                        os.rename(aside, target)
                    raise
                if aside is not None:
                    if aside.is_dir() and not aside.is_symlink():
                        shutil.rmtree(aside, ignore_errors=True)
                    else:
                        aside.unlink(missing_ok=True)
            else:
                os.replace(staged, target)
        except OSError as exc:
            raise self.os_error(exc, target) from None
        return target
