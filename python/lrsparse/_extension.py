"""Loads the compiled extension and checks it was built against the torch that is installed."""
from __future__ import annotations

import torch


class BuildMismatchError(ImportError):
    """The compiled lrsparse extension does not match the installed torch."""


def check_build_info(info: dict, torch_version: str, torch_cuda: str | None) -> None:
    """Raises BuildMismatchError when the build metadata does not fit the running torch.

    The whole version string is compared: "2.13.0+cpu" and "2.13.0+cu130" are different builds with different
    libraries, and the C++ ABI of torch is only stable within one exact build.
    """
    built = str(info["torch_version"]).strip()
    if built != torch_version.strip():
        raise BuildMismatchError(
            f"lrsparse was built against torch {built} but torch {torch_version} is installed; the C++ ABI differs. "
            "Rebuild lrsparse with the installed torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps ."
        )
    if info["cuda"] and not torch_cuda:
        raise BuildMismatchError(
            "lrsparse was built with CUDA kernels but the installed torch is a CPU-only build; rebuild lrsparse."
        )


def load_extension():
    try:
        from lrsparse import _C  # registers the torch.ops.lrsparse.* schemas and kernels
    except ImportError as exc:
        raise ImportError(
            f"lrsparse: the compiled extension lrsparse._C could not be loaded ({exc}). Rebuild it against the "
            f"installed torch {torch.__version__}: pip install --no-build-isolation . (or `make install`)."
        ) from exc
    info = dict(_C.build_info())
    check_build_info(info, torch.__version__, torch.version.cuda)
    return _C, info
