"""File writes that never leave a half-written file: write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def check_output_path(path: str | os.PathLike, setting: str, directory: bool) -> None:
    """Raise UserError when `path` cannot be written later: it (for a directory) or a parent is a file.

    setting: how the user set the path (an option or a config key), named in the error. Called before
    long work, so that a bad output path does not cost the work.
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{setting} {path} is a file, expected a directory; choose another path")
    if not directory and path.is_dir():
        raise UserError(f"{setting} {path} is a directory; pass a file path such as {path / 'results.json'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{setting} {path} lies under {parent}, which is a file; choose another path")
            if not os.access(parent, os.W_OK):
                raise UserError(f"{setting} {path} cannot be created: {parent} is not writable; choose another path")
            return


def read_json_object(path: str | os.PathLike) -> dict | None:
    """Read the JSON object in `path`, or return None when the file is missing.

    A file that is not valid JSON, or contains another JSON type, raises UserError naming it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); rerun the command that writes it, or delete it") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} contains a JSON {type(data).__name__}, expected an object; rerun the command that "
                        "writes it, or delete it")
    return data


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}. Choose a writable output path.") from error
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_readable(directory: Path) -> None:
    """Give a staged output directory the usual permissions (0755, files 0644): temporary
    directories and some writers create them private to the owner."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike):
    """Yield a temporary directory beside `directory`; on success it replaces `directory`.

    A crash or an exception inside the block removes the temporary directory and leaves any
    existing `directory` untouched, so no half-written output is ever visible under its name.
    """
    directory = Path(directory)
    check_output_path(directory, "output path", directory=True)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as error:
        raise UserError(f"cannot write {directory}: {error.strerror}. Choose a writable output path.") from error
    try:
        yield staging
        make_readable(staging)
        if directory.exists():
            # Move the old directory aside first, so a crash here leaves it whole under the backup name.
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            try:
                directory.rename(backup / directory.name)
            except OSError as error:
                backup.rmdir()
                raise UserError(f"cannot replace {directory}: {error.strerror}. Choose another output path.") from error
            staging.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
