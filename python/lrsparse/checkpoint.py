"""Checkpoints of a compression run: atomic files and ``<output>/checkpoint``.

``manifest.json`` holds the run's config, per-stage records and the SHA-256 of the latest state file (only that
one is kept). Every file is written to a temporary file, fsynced and renamed; the manifest is written last, so a
checkpoint counts only once its state is on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from lrsparse.distributed import is_main_process
from lrsparse.io import _fsync_dir

# 3: distillation, precision, calibration and layer-matching options in the run's identity, the pruner's Fisher state
# only when used (lrsparse 0.3); 2: the Compressor's state and layer records (0.2); 1: lrsparse 0.1.
CHECKPOINT_FORMAT = 3


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Calls ``write(handle)`` on a temporary file next to ``path``, fsyncs it and renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; the result should have the usual permissions
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write(path, lambda handle: json.dump(payload, handle, indent=2, sort_keys=False), binary=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (missing, corrupted, or from a different configuration)."""


class CheckpointStore:
    """``<output>/checkpoint``: the manifest plus the state file of the latest checkpoint.

    ``manifest["stages"]`` records the completed stages; ``manifest["in_progress"]``, when present, an intra-stage
    checkpoint of the stage after them (its state supersedes the last completed stage's).
    """

    def __init__(self, output_dir: Path):
        self.directory = output_dir / "checkpoint"
        self.manifest_path = self.directory / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {self.manifest_path}: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format_version") != CHECKPOINT_FORMAT:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise CheckpointError(
                f"{self.manifest_path} is not a version-{CHECKPOINT_FORMAT} lrsparse checkpoint (found version "
                f"{version!r}; checkpoints of lrsparse 0.1 cannot be resumed by this version: finish the run with "
                "lrsparse 0.1 or start it again with --overwrite)")
        return manifest

    def commit(self, manifest: dict, stage: dict, state: dict, in_progress: bool = False) -> None:
        """Writes the state, then the manifest that records it (as a completed stage, or with ``in_progress`` as
        the stage's latest intra-stage checkpoint); removes the previous state files. In a multi-process run only
        rank 0 writes (the other ranks record the stage in their in-memory manifest)."""
        if not is_main_process():
            self._record(manifest, stage, in_progress)
            return
        suffix = f"-step{stage['step']}" if in_progress else ""
        filename = f"stage{stage['index']}-{stage['name']}{suffix}.pt"
        path = self.directory / filename
        atomic_write(path, lambda handle: torch.save(state, handle))
        stage["state_file"] = filename
        stage["sha256"] = sha256_file(path)
        stage["state_bytes"] = path.stat().st_size
        previous = self._state_files(manifest)
        self._record(manifest, stage, in_progress)
        atomic_write_json(self.manifest_path, manifest)
        for old in previous:
            if old != filename:
                (self.directory / old).unlink(missing_ok=True)

    @staticmethod
    def _record(manifest: dict, stage: dict, in_progress: bool) -> None:
        if in_progress:
            manifest["in_progress"] = stage
        else:
            manifest.pop("in_progress", None)
            manifest["stages"].append(stage)

    @staticmethod
    def _state_files(manifest: dict) -> list[str]:
        records = [*manifest["stages"], *([manifest["in_progress"]] if "in_progress" in manifest else [])]
        return [r["state_file"] for r in records if r.get("state_file")]

    def remove_states(self) -> None:
        """Removes every state file (all are named ``stage*.pt`` by ``commit``), those the manifest names and any
        orphan: a process killed between a commit's manifest write and its removal of the previous state leaves
        that state unreferenced, and a resumed run never sees it. The manifest keeps every stage's record."""
        for path in self.directory.glob("stage*.pt"):
            path.unlink(missing_ok=True)

    def load_state(self, stage: dict) -> dict:
        path = self.directory / stage["state_file"]
        if not path.is_file():
            raise CheckpointError(f"state file {path} of stage {stage['name']!r} is missing")
        actual = sha256_file(path)
        if actual != stage["sha256"]:
            raise CheckpointError(f"state file {path} is corrupted: SHA-256 {actual} != manifest {stage['sha256']}")
        return torch.load(path, map_location="cpu", weights_only=True)


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
