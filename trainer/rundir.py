"""The run directory: where every file of a run lives, and atomic writes into it.

    OUT/config.resolved.toml      the resolved configuration (defaults + file + flags)
    OUT/logs/<command>.log        logs of each command (appended)
    OUT/cache/                    text embeddings and image latents (reused across commands)
    OUT/stats/{unsafe,safe}.safetensors   Gram statistics with progress (resumable)
    OUT/select/                   scores.png, heads.csv, heads.md, selection.json
    OUT/checkpoints/step-NNNNNNNN/  generator + optimizer state (rotated)
    OUT/adapter.safetensors       the result
    OUT/metrics.json              metrics of every stage
    OUT/evaluate/                 evaluation images and metrics

Every file is written to a temporary name and renamed into place, so an interrupted run
never leaves a half-written file; bad inputs are rejected before the directory is touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import RESOLVED_NAME, RunConfig, jsonable, to_toml

logger = logging.getLogger(__name__)


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

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints (those with a state.json), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        dirs = [d for d in self.checkpoints.iterdir()
                if d.is_dir() and d.name.startswith("step-") and (d / "state.json").is_file()]
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
