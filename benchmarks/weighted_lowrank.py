"""Timings of weighted_lowrank on CPU: truncated SVD vs torch.linalg.svd, EM vs the full-SVD EM reference.

Run: PYTHONPATH=python python benchmarks/weighted_lowrank.py [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from lrsparse import ops, reference


def decaying_spectrum_matrix(m: int, n: int, power: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g)).Q
    return ((u * torch.arange(1, k + 1, dtype=torch.float64) ** -power) @ v.T).float()


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_truncation(m: int, n: int, rank: int) -> None:
    w = decaying_spectrum_matrix(m, n)

    def full_svd():
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]

    t_svd, t_op = best_time(full_svd), best_time(lambda: ops.weighted_lowrank(w, rank))
    U, V = ops.weighted_lowrank(w, rank)
    optimal = torch.linalg.svdvals(w.double())[rank:].square().sum().item()
    rel = reference.weighted_error(w, U, V).item() / optimal - 1
    print(f"truncated {m}x{n} r={rank}: torch.linalg.svd {t_svd * 1e3:.1f} ms, op {t_op * 1e3:.1f} ms "
          f"({t_svd / t_op:.1f}x), error vs optimal {rel:+.1e}")


def bench_em(m: int, n: int, rank: int, reference_iters: int) -> None:
    w = decaying_spectrum_matrix(m, n)
    kept = w.abs() >= w.abs().flatten().kthvalue(int(0.75 * w.numel())).values
    omega = torch.where(kept, 1.0, 0.05)
    start = time.perf_counter()
    U, V = reference.weighted_lowrank(w, rank, omega, max_iters=reference_iters, tol=0.0)
    t_ref = time.perf_counter() - start
    target = reference.weighted_error(w, U, V, omega).item()
    # Fewest iterations of the op that reach the reference's final weighted error.
    for iters in range(1, 4 * reference_iters + 1):
        U, V = ops.weighted_lowrank(w, rank, omega, max_iters=iters, tol=0.0)
        if reference.weighted_error(w, U, V, omega).item() <= target:
            break
    t_op = best_time(lambda: ops.weighted_lowrank(w, rank, omega, max_iters=iters, tol=0.0), repeats=2)
    err = reference.weighted_error(w, U, V, omega).item()
    print(f"EM {m}x{n} r={rank}: reference {reference_iters} it {t_ref:.2f} s (error {target:.6g}), "
          f"op {iters} it {t_op:.3f} s (error {err:.6g}): {t_ref / t_op:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--reference-iters", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for m, n, r in ((768, 3072, 192), (384, 1536, 96), (768, 3072, 64)):
        bench_truncation(m, n, r)
    for m, n, r in ((384, 1536, 96), (384, 1536, 48), (768, 3072, 192), (768, 3072, 96)):
        bench_em(m, n, r, args.reference_iters)


if __name__ == "__main__":
    main()
