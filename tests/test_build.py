"""The extension is registered as promised and refuses to run against a torch it was not built for."""
import os

import pytest
import torch

import lrsparse
from lrsparse._extension import BuildMismatchError, check_build_info

OPS = [
    "accumulate_importance_",
    "global_topk_threshold",
    "apply_threshold_mask_",
    "weighted_lowrank",
    "mixed_rank_linear",
    "mixed_rank_linear_backward",
]


def test_build_info_matches_running_torch():
    info = lrsparse.BUILD_INFO
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == (torch.version.cuda is not None and info["cuda"])
    assert info["compiler"]


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_cpu_kernel_and_fake(name):
    op = getattr(torch.ops.lrsparse, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), f"{name} has no CPU kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or torch._library.simple_registry.singleton.find(
        op.name()
    ).fake_impl.kernel is not None, f"{name} has no fake kernel"


@pytest.mark.parametrize("name", OPS)
def test_cuda_kernels_registered_exactly_in_a_cuda_build(name):
    # Runs without a GPU: registration happens at import, so a CUDA build proves its kernels reached the dispatcher
    # (a .cu file left out of the build, or a TORCH_LIBRARY_IMPL compiled out, fails here), and a CPU build proves
    # BUILD_INFO["cuda"] is not claiming kernels that are absent.
    op = getattr(torch.ops.lrsparse, name).default
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    assert has_cuda_kernel == lrsparse.BUILD_INFO["cuda"], (
        f"{name}: CUDA kernel registered={has_cuda_kernel} but BUILD_INFO['cuda']={lrsparse.BUILD_INFO['cuda']}"
    )


def test_cuda_build_when_expected():
    # `make cuda-build` sets LRSPARSE_EXPECT_CUDA_BUILD=1: a build that silently fell back to CPU kernels must fail
    # the suite there rather than pass it with every CUDA check skipped.
    if os.environ.get("LRSPARSE_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("LRSPARSE_EXPECT_CUDA_BUILD is not 1: either build is acceptable")
    assert lrsparse.BUILD_INFO["cuda"], f"expected a CUDA build of lrsparse, got BUILD_INFO={lrsparse.BUILD_INFO}"


def test_in_place_ops_declare_mutation():
    schema = torch.ops.lrsparse.accumulate_importance_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"ema", "uncertainty", "fisher"}
    schema = torch.ops.lrsparse.apply_threshold_mask_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"masks", "weights"}


def test_torch_version_mismatch_is_a_readable_error():
    info = dict(lrsparse.BUILD_INFO, torch_version="2.1.0+cpu")
    with pytest.raises(BuildMismatchError, match=r"built against torch 2\.1\.0\+cpu .*Rebuild"):
        check_build_info(info, torch.__version__, torch.version.cuda)


def test_cuda_build_on_cpu_torch_is_a_readable_error():
    info = dict(lrsparse.BUILD_INFO, cuda=True)
    with pytest.raises(BuildMismatchError, match="CPU-only"):
        check_build_info(info, info["torch_version"], None)
