"""Optional TensorBoard scalars (density, alpha, loss, metrics) for the pipeline and the Trainer callbacks."""
from __future__ import annotations

import os

from lrsparse.distributed import is_main_process


def summary_writer_class(log_dir: str | os.PathLike):
    """torch's SummaryWriter; ImportError saying how to fix it when TensorBoard (requested by ``log_dir``) is
    missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            f"TensorBoard logging to {str(log_dir)!r} was requested but TensorBoard is not installed ({exc}); "
            "install it with `pip install tensorboard` or drop the option"
        ) from exc
    return SummaryWriter


def open_summary_writer(log_dir: str | os.PathLike | None):
    """A SummaryWriter on ``log_dir`` in the main process; None when ``log_dir`` is None and on other ranks."""
    if log_dir is None:
        return None
    writer_class = summary_writer_class(log_dir)
    return writer_class(str(log_dir)) if is_main_process() else None
