"""The run folder of an embedded RL run: one writer, checksummed checkpoints, nothing half-written.

`--out` holds `.lock` (held while a process trains in it), `config.json`, `metrics.jsonl`,
`checkpoints/step_NNNNNNN.pt` each with a `.sha256` sidecar (sha256sum format), `checkpoints/latest`
(the file name of the newest checkpoint), and `policy/` at the end. Checkpoints load with
`torch.load(weights_only=True)` (no unpickling of code); a damaged one is skipped for the newest intact one.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from v05_rl.types import UpdateStats

CHECKPOINT_FORMAT = 2  # 2: RNG states as plain lists (loadable with weights_only=True) and a SHA-256 sidecar
CHECKPOINT_NAME = re.compile(r"^step_(\d{7,})\.pt$")
LOCK_FILE = ".lock"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: another process trains in it, it already holds a run,
    or it has no intact checkpoint to resume from. The message names the folder and the fix."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that fails its checksum, cannot be read without unpickling code, or has another format."""


class CheckpointWarning(UserWarning):
    """A checkpoint (or `latest`) was skipped and an older intact checkpoint is used instead."""


class TrainingDiverged(ValueError):
    """The loss, the gradient norm or a weight became non-finite; raised before the step is logged or saved."""


class RunLock:
    """Exclusive lock of a run folder for the lifetime of a run (`with RunLock(out): ...`).

    `flock` on `<out>/.lock`, taken without waiting: a second process on the same folder is refused with a
    `RunFolderError` instead of interleaving its metrics and checkpoints with the first one's. The lock
    dies with its process (kill -9 included), so a crashed run never leaves a stale lock. The file is empty
    and never written (taking the lock changes no byte of the folder); it stays after the run (removing it
    would race with a process that has it open). When the lock created `out` and the run fails before
    writing anything else, the folder is removed again.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.handle: Any = None
        self.created = False

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no advisory locks, run unprotected
            fcntl = None
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise RunFolderError(
                    f"{self.out} is in use by another run (another process holds the lock {self.path}); wait for "
                    "it to finish, or choose another --out") from None
        self.handle = handle
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.handle.close()  # closing the descriptor releases the flock
        self.handle = None
        if exc_type is not None and self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.out.rmdir()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def checksum_path(path: Path) -> Path:
    """The SHA-256 sidecar of a checkpoint file (`step_NNNNNNN.pt.sha256`)."""
    return path.with_name(path.name + ".sha256")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state after verifying its SHA-256 sidecar, loaded with `torch.load(weights_only=True)`
    (tensors and plain containers only: a checkpoint cannot run code). Raises `CorruptCheckpoint`."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        raise CorruptCheckpoint(f"{path}: missing or not a plain file")
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        raise CorruptCheckpoint(f"{path}: no checksum file {sidecar.name} (written by an older version, or the "
                                "save was interrupted)")
    expected = (sidecar.read_text().split() or [""])[0]
    if file_sha256(path) != expected:
        raise CorruptCheckpoint(f"{path}: SHA-256 does not match {sidecar.name} (truncated or modified)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not a checkpoint we can trust
        raise CorruptCheckpoint(f"{path}: cannot be loaded as plain tensors ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpoint(f"{path}: checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
    return state


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try, in order: the one `latest` names (when it is a checkpoint file of `ckpt_dir`),
    then every `step_*.pt` of `ckpt_dir`, newest step first. A `latest` naming anything else (a path,
    `../..`, an absolute name, a missing file) is ignored with a `CheckpointWarning`."""
    found = sorted((p for p in ckpt_dir.glob("step_*.pt") if CHECKPOINT_NAME.match(p.name)),
                   key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)), reverse=True)
    order: list[Path] = []
    latest = ckpt_dir / "latest"
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        if CHECKPOINT_NAME.match(name) and (ckpt_dir / name) in found:
            order.append(ckpt_dir / name)
        else:
            warnings.warn(f"{latest} names {name[:80]!r}, which is not a checkpoint file of {ckpt_dir} "
                          "(step_NNNNNNN.pt); ignoring it", CheckpointWarning, stacklevel=2)
    return order + [p for p in found if p not in order]


def newest_intact_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the first candidate (`checkpoint_candidates`) that passes `read_checkpoint`; each
    damaged one is skipped with a `CheckpointWarning` naming it. None when the folder has no checkpoint;
    `RunFolderError` when it has some and none is intact."""
    damaged: list[str] = []
    for path in checkpoint_candidates(ckpt_dir):
        try:
            state = read_checkpoint(path)
        except CorruptCheckpoint as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}", CheckpointWarning, stacklevel=2)
            damaged.append(path.name)
            continue
        if damaged:
            warnings.warn(f"resuming from {path} (the newest intact checkpoint) instead of {', '.join(damaged)}",
                          CheckpointWarning, stacklevel=2)
        return path, state
    if damaged:
        raise RunFolderError(f"{ckpt_dir}: no intact checkpoint to resume from (damaged: {', '.join(damaged)}); "
                             "start a new --out, or delete the checkpoints folder to restart this run from step 0")
    return None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py, npy = rng["python"], rng["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np.random.set_state({"bit_generator": npy["bit_generator"],
                         "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_finite(step: int, upd: UpdateStats, model: torch.nn.Module, lr: float) -> None:
    """Stop a diverged run: raise `TrainingDiverged` when the policy loss, the gradient norm (before
    clipping) or any weight after the update is NaN or infinite. Called before the step is logged,
    evaluated or checkpointed, so no checkpoint ever holds non-finite weights. `step` is numbered as in
    metrics.jsonl (the step's line would say `step`, i.e. steps done including this one)."""
    bad = [name for name, value in (("policy loss", upd.pg_loss), ("gradient norm", upd.grad_norm))
           if not math.isfinite(value)]
    params = [p.detach() for p in model.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        bad.append("weights")
    if bad:
        raise TrainingDiverged(
            f"step {step}: non-finite {' and '.join(bad)} (NaN or infinity) at learning rate {lr:g}; the run stopped "
            "before logging or saving this step. Fix: start a new --out with a smaller optim.lr (--lr), "
            "or a smaller optim.grad_clip; the checkpoints already written are all from before the divergence")


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "LOCK_FILE",
    "RunFolderError",
    "CorruptCheckpoint",
    "CheckpointWarning",
    "TrainingDiverged",
    "RunLock",
    "file_sha256",
    "write_atomic",
    "checksum_path",
    "read_checkpoint",
    "checkpoint_candidates",
    "newest_intact_checkpoint",
    "rng_state",
    "set_rng_state",
    "check_finite",
]
