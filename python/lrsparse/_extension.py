"""Loads the compiled extension and checks it was built against the torch that is installed."""
from __future__ import annotations

import torch


class BuildMismatchError(ImportError):
    """The compiled lrsparse extension does not match the installed torch."""


def _base_version(version: str) -> str:
    # "2.13.0+cpu" and "2.13.0+cu130" are different builds: compare the whole string.
    return version.strip()


def load_extension():
    try:
        from lrsparse import _C  # noqa: F401  (registers torch.ops.lrsparse.* kernels)
    except ImportError as exc:
        raise ImportError(
            "lrsparse: the compiled extension lrsparse._C could not be loaded "
            f"({exc}). Rebuild it against the installed torch {torch.__version__}: "
            "pip install --no-build-isolation -e . (or `make build`)."
        ) from exc
    info = dict(_C.build_info())
    built, installed = _base_version(info["torch_version"]), _base_version(torch.__version__)
    if built != installed:
        raise BuildMismatchError(
            f"lrsparse was built against torch {built} but torch {installed} is installed; the C++ ABI differs. "
            "Rebuild lrsparse with the installed torch: pip install --no-build-isolation --force-reinstall ."
        )
    if info["cuda"] and not torch.version.cuda:
        raise BuildMismatchError(
            "lrsparse was built with CUDA kernels but the installed torch is a CPU-only build; rebuild lrsparse."
        )
    return _C, info
