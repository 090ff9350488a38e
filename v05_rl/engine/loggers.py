"""Optional extra metrics loggers of a run (`none`, `wandb`, `tensorboard`); metrics.jsonl is always written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from v05_rl.engine.config import LOGGERS


class _Logger:
    def log(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class _WandbLogger(_Logger):
    def __init__(self, out: Path, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--logger wandb needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        self.run = wandb.init(project="v05", dir=str(out), config=dict(config))

    def log(self, record):
        data = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
        self.run.log(data, step=int(record.get("step", 0)))

    def close(self):
        self.run.finish()


class _TensorboardLogger(_Logger):
    def __init__(self, out: Path, config: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", json.dumps(dict(config), indent=1, default=str))

    def log(self, record):
        step = int(record.get("step", 0))
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and k != "step":
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self):
        self.writer.close()


def make_logger(name: str, out: Path, config: Mapping[str, Any]) -> _Logger | None:
    """The optional extra logger (`none`, `wandb`, `tensorboard`), imported only when asked for."""
    if name == "none":
        return None
    if name == "wandb":
        return _WandbLogger(out, config)
    if name == "tensorboard":
        return _TensorboardLogger(out, config)
    raise ValueError(f"logger {name!r} unknown; use one of {', '.join(LOGGERS)}")


__all__ = ["make_logger"]
