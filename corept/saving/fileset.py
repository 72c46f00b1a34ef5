"""Writing corept's files into a folder that may hold other files: atomic per set, recoverable.

A save is a *file set*: the model or adapter files, the tokenizer's and corept's manifest
(:data:`MANIFEST`, listing the set). :func:`file_set` writes the new set into a hidden staging
folder inside the target, then commits it:

1. a journal (:data:`JOURNAL`, written atomically) records the staging folder, the new set and the
   previous set (the previous manifest's list);
2. every new file is moved into place with one ``os.replace`` each, the manifest last;
3. files of the previous set that the new one lacks are removed; the staging folder and the journal go.

Nothing else in the folder is touched. Every file of a set is always present, holding the previous
or the new save's bytes; a crash during step 2 (a few renames) can leave the two sets' files mixed,
and the next ``corept.save`` or ``corept.load`` of the folder finishes the commit from the journal
(:func:`recover`). A crash before the journal exists leaves the previous save untouched and a
staging folder that the next save removes (and says so). The manifest names the set corept wrote,
so a later save removes exactly those files when its own set is smaller.

:func:`atomic_folder` is the other form, for folders corept owns whole (its caches): a temporary
folder renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("corept")

MANIFEST = "corept_save.json"
JOURNAL = ".corept-save-journal.json"
STAGING_PREFIX = ".corept-staging-"


def _umask_mode(mode: int = 0o777) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def saved_files(path: Path) -> list[str]:
    """The files of the set corept last saved in ``path`` (its manifest's list), or ``[]``."""
    try:
        return list(json.loads((path / MANIFEST).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return []


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _finish(path: Path, journal: dict) -> None:
    """Step 2 and 3 of the commit (idempotent: a second run after a crash completes the first)."""
    staging = path / journal["staging"]
    new = journal["files"]
    for rel in new:
        src = staging / rel
        if src.exists():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, path / rel)
    for rel in journal["old"]:
        if rel not in new:
            (path / rel).unlink(missing_ok=True)
            parent = (path / rel).parent
            while parent != path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    shutil.rmtree(staging, ignore_errors=True)
    (path / JOURNAL).unlink(missing_ok=True)


def recover(path: str | os.PathLike) -> list[str]:
    """Finish or clean up what an interrupted save left at ``path``; returns what was done (each
    also logged as a warning). Also restores or removes the folders the earlier, folder-swapping
    ``corept.save`` could leave beside ``path``."""
    path = Path(path).expanduser().resolve()
    done = []
    journal = path / JOURNAL
    if journal.is_file():
        _finish(path, json.loads(journal.read_text()))
        done.append(f"finished an interrupted save in {path} (its journal listed the new files)")
    for stray in sorted(path.glob(STAGING_PREFIX + "*")) if path.is_dir() else []:
        size = sum(p.stat().st_size for p in stray.rglob("*") if p.is_file())
        shutil.rmtree(stray, ignore_errors=True)
        done.append(f"removed {stray.name}, the unfinished files of an interrupted save ({size / 2**20:.1f} MiB)")
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists():
            os.replace(old, path)
            done.append(f"restored {path} from {old.name}, the previous save an interrupted one had moved aside")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}, the previous save an interrupted one had moved aside")
    for tmp in sorted(path.parent.glob(f".{path.name}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed {tmp.name}, the unfinished files of an interrupted save")
    for line in done:
        logger.warning("corept: %s", line)
    return done


def remove(path: str | os.PathLike) -> list[str]:
    """Remove the file set corept last saved in ``path`` (and nothing else); returns the files removed."""
    path = Path(path).expanduser()
    files = saved_files(path)
    if files:
        _finish(path, {"staging": STAGING_PREFIX + "none", "files": [], "old": files})
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return files


@contextmanager
def file_set(path: str | os.PathLike, metadata: dict) -> Iterator[Path]:
    """Yield a staging folder; write the new set there. On success it becomes ``path``'s corept set
    (see the module docstring); ``metadata`` goes into the manifest with the list of files."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    recover(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
    committing = False
    try:
        yield staging
        readme = staging / "README.md"  # peft's generated model card never replaces the user's own
        if readme.exists() and (path / "README.md").exists() and "README.md" not in saved_files(path):
            readme.unlink()
        files = [f for f in _files(staging) if f != MANIFEST] + [MANIFEST]
        _write_json_atomic(staging / MANIFEST, {**metadata, "files": files})
        committing = True
        _write_json_atomic(path / JOURNAL, {"staging": staging.name, "files": files, "old": saved_files(path)})
        _finish(path, json.loads((path / JOURNAL).read_text()))
    finally:
        if not committing and staging.exists():  # interrupted while writing: the previous save stands
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(path.iterdir()):
                path.rmdir()


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.
    Only for folders corept owns whole (its caches): anything else in ``path`` is replaced too."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; a cache folder reads like any other
    try:
        yield tmp
        backup = None
        if path.exists():
            backup = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
