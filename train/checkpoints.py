"""Training checkpoints: RUN/checkpoints/step_N written under a temporary name, then renamed.

A checkpoint directory is complete when it holds `checkpoint.json`, which is written last; a
kill while saving leaves only a `.step_N.tmp` directory that `latest` ignores. The last
`keep` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from mambaspin.errors import UserError
from mambaspin.io import write_json_atomic

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "checkpoint.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, name: str, hint: str = "start without --resume_from_checkpoint") -> Path:
    """Resolve `latest`, `step_N` or a path to a complete checkpoint directory; `hint` ends the
    error message when there is none."""
    if name == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise UserError(f"no complete checkpoint under {checkpoint_root(output_dir)}; {hint}")
        return found[-1]
    path = Path(name)
    if not path.is_dir():
        path = checkpoint_root(output_dir) / name
    if not (path / MARKER).is_file():
        raise UserError(f"{name} is not a complete checkpoint (no {MARKER} in {path}); "
                        "pass latest, step_N or a checkpoint directory")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, metadata: dict, keep: int) -> Path | None:
    """Save accelerate state for `step` atomically; only the main process writes files."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step}"
    staging = root / f".step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            write_json_atomic(staging / MARKER, {"step": step, **metadata})
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
    except BaseException:  # Ctrl-C or a write error: drop the partial checkpoint, keep the earlier ones
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def read_metadata(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint {path} has an unreadable {MARKER}: {error}") from error
