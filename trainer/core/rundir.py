"""The run directory: where every file of a run lives, and atomic writes into it.

    OUT/config.resolved.toml      the resolved configuration (defaults + file + flags)
    OUT/logs/<command>.log        logs of each command (appended)
    OUT/cache/                    text embeddings and image latents (reused across commands)
    OUT/stats/{unsafe,safe}.safetensors   Gram statistics with progress (resumable)
    OUT/select/                   scores.png, heads.csv, heads.md, selection.json
    OUT/stats/{unsafe,safe}.prev.safetensors  the save before (a fallback if the newest is damaged)
    OUT/checkpoints/step-NNNNNNNN/  generator + optimizer state + manifest.json (rotated)
    OUT/adapter.safetensors       the result
    OUT/metrics.json              metrics of every stage
    OUT/evaluate/                 evaluation images and metrics

Every file is written to a temporary name and renamed into place, so an interrupted run
never leaves a half-written file; bad inputs are rejected before the directory is touched.
A checkpoint folder ends with ``manifest.json`` (size and SHA-256 of each file, written last), so
a file damaged later is found before it is trusted (:func:`check_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import RESOLVED_NAME, RunConfig, jsonable, to_toml
from .errors import TrainerError, UsageError

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-([0-9]+)")


class DamagedFileError(TrainerError):
    """A file of a run (checkpoint, statistics) or of a model is truncated or corrupt; names the file."""

logger = logging.getLogger(__name__)


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """Raise :class:`UsageError` unless ``path`` is, or can be created as, a writable directory.

    An existing folder is checked with ``os.access``; for a new one the nearest existing parent
    must be a folder that accepts a new directory (probed with an empty temporary folder, removed
    at once), so ``/proc/x`` or a read-only disk fails here and not after the first write.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} exists and is not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {str(path)!r}: the directory is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(parent)!r} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".saferope-probe-", dir=parent)
    except OSError as e:
        raise UsageError(f"{flag} {str(path)!r}: cannot create a directory in {str(parent)!r} "
                         f"({e.strerror or type(e).__name__})") from None
    os.rmdir(probe)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, names: list[str]) -> None:
    """``folder/manifest.json``: size and SHA-256 of each named file (write it after them)."""
    files = {n: {"size": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names}
    atomic_write_json(folder / MANIFEST, {"format": 1, "files": files})


def check_manifest(folder: Path) -> bool:
    """Check the files against ``folder/manifest.json``; ``False`` when there is none (older runs).

    Raises :class:`DamagedFileError` naming the first file that is missing or differs.
    """
    path = folder / MANIFEST
    if not path.exists():
        return False
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(str(n), int(e["size"]), str(e["sha256"])) for n, e in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedFileError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    for name, size, digest in entries:
        f = folder / name
        if not f.is_file():
            raise DamagedFileError(f"{f}: missing (listed in {MANIFEST})")
        actual = f.stat().st_size
        if actual != size:
            raise DamagedFileError(f"{f}: {actual} bytes, the manifest says {size} (truncated or replaced)")
        if file_sha256(f) != digest:
            raise DamagedFileError(f"{f}: content differs from its SHA-256 in {MANIFEST} (corrupt)")
    return True


#: Bytes per element of the safetensors dtypes (sub-byte and unknown dtypes skip the size check).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own header limit


def safetensors_header(path: Path) -> dict[str, Any]:
    """The parsed header of a safetensors file, after checking it describes the whole file.

    Reads only the header: every tensor's byte range must match its dtype and shape, and the
    data must end exactly at the end of the file (a truncated or padded file fails). Raises
    :class:`DamagedFileError` naming the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise DamagedFileError(f"{path}: not a complete safetensors file ({size} bytes, header length "
                                       f"{n if n >= 0 else 'missing'})")
            header = json.loads(f.read(n).decode("utf-8"))
    except DamagedFileError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedFileError(f"{path}: unreadable safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: the safetensors header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in [*shape, a, b]) or b < a:
                raise ValueError("negative or non-integer shape/offsets")
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedFileError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from None
        item = _DTYPE_BYTES.get(dtype)
        if item is not None and b - a != math.prod(shape) * item:
            raise DamagedFileError(f"{path}: tensor {name!r} takes {b - a} bytes, its shape {shape} in {dtype} "
                                   f"needs {math.prod(shape) * item}")
        end = max(end, b)
    if 8 + n + end != size:
        raise DamagedFileError(f"{path}: {size} bytes, its header describes {8 + n + end} (truncated or damaged)")
    return header


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")


def atomic_save_image(image, path: Path) -> None:
    """Save a PIL image atomically (format from the suffix)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    atomic_write_bytes(path, buf.getvalue())


class RunDir:
    """Paths of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / RESOLVED_NAME)
    logs = property(lambda self: self.root / "logs")
    cache = property(lambda self: self.root / "cache")
    stats = property(lambda self: self.root / "stats")
    select = property(lambda self: self.root / "select")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter.safetensors")
    metrics = property(lambda self: self.root / "metrics.json")
    evaluate = property(lambda self: self.root / "evaluate")

    def stats_file(self, name: str) -> Path:
        return self.stats / f"{name}.safetensors"

    def selection_file(self) -> Path:
        return self.select / "selection.json"

    def has_run(self) -> bool:
        return self.config.is_file()

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config, to_toml(cfg))

    def update_metrics(self, section: str, values: dict[str, Any]) -> None:
        data = {}
        if self.metrics.is_file():
            try:
                data = json.loads(self.metrics.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                logger.warning("%s was unreadable; starting it afresh", self.metrics)
        data[section] = values
        atomic_write_json(self.metrics, data)

    def previous_stats_file(self, name: str) -> Path:
        """The statistics save before the newest one (kept as a fallback)."""
        return self.stats / f"{name}.prev.safetensors"

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        """Checkpoint folders ``step-N``, oldest first (intact or not: see ``train.verify_checkpoint``).

        Only committed folders are listed: a checkpoint is written into a hidden temporary folder
        and renamed into place when complete.
        """
        if not self.checkpoints.is_dir():
            return []
        dirs = [d for d in self.checkpoints.iterdir() if d.is_dir() and _STEP_DIR.fullmatch(d.name)]
        return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))

    def new_checkpoint_dir(self, step: int) -> tuple[Path, Path]:
        """``(tmp, final)``: write into ``tmp`` and :func:`commit_dir` it to ``final``."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.checkpoints))
        return tmp, final

    def rotate_checkpoints(self, keep: int) -> None:
        for d in self.checkpoint_dirs()[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.checkpoints.glob(".step-*"):  # leftovers of interrupted writes
            shutil.rmtree(d, ignore_errors=True)


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary directory into place (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
