"""Optional TensorBoard logging of loss and learning rate (``pip install tensorboard``)."""
from __future__ import annotations

from pathlib import Path

from .callbacks import Callbacks, StepInfo
from .errors import require


class TensorBoardCallbacks(Callbacks):
    def __init__(self, log_dir: Path):
        require("tensorboard", "tensorboard", "TensorBoard logging")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def on_step(self, info: StepInfo) -> None:
        self.writer.add_scalar("loss", info.loss, info.step)
        self.writer.add_scalar("lr", info.lr, info.step)
        if info.step == info.total_steps:
            self.writer.flush()
