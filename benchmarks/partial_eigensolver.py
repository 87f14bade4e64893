"""Can a partial (top-r only) eigensolver beat the full one inside `weighted_lowrank` without omega, on 768 x 768 at
rank 192, at equal error? The op forms the Gram matrix G = W W^T and takes its top-r eigenvectors from a full
`eigh`; this measures the iterative alternatives on the same G, in one run:

- subspace iteration with Rayleigh-Ritz (block r + p, t iterations), and
- block Krylov (Musco & Musco 2015: basis [Q, GQ, ..., G^q Q] of block b, then Rayleigh-Ritz), and
- LAPACK's partial solver itself (`syevr` for the top r only, through scipy, one thread): exact, but the tridiagonal
  reduction it shares with the full solver dominates,

each reported as its excess error, ||W - W_r||_F^2 / optimal - 1, and its time against the full `eigh`, the op and a
full SVD + truncation. Matrices: a Gaussian one (a flat Marchenko-Pastur spectrum), two real all-MiniLM-L6-v2
feed-forward blocks (768 x 768 cut from layers 0 and 1), and one with a decaying spectrum (the easy case).

    PYTHONPATH=python python benchmarks/partial_eigensolver.py --markdown benchmarks/results/partial_eigensolver_cpu.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, median_ms, save_report  # noqa: E402

import lrsparse  # noqa: E402,F401  (registers torch.ops.lrsparse)
from lrsparse.modeling import default_model  # noqa: E402

RANK = 192


def matrices() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(0)
    weights = load_file(str(Path(default_model()) / "model.safetensors"))
    ffn = [weights[f"encoder.layer.{i}.intermediate.dense.weight"] for i in (0, 1)]  # 1536 x 384 each
    decay = torch.logspace(0, -1.5, 768)
    rotation = torch.linalg.qr(torch.randn(768, 768, generator=generator))[0]
    return {"gaussian": torch.randn(768, 768, generator=generator),
            "MiniLM FFN (layers 0+1)": torch.cat([ffn[0][:768], ffn[1][:768]], 1).contiguous(),
            "decaying spectrum": (torch.randn(768, 768, generator=generator) * decay) @ rotation}


def subspace_iteration(w: torch.Tensor, gram: torch.Tensor, oversample: int, iterations: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(w @ torch.randn(w.shape[1], RANK + oversample, generator=generator))[0]
    for _ in range(iterations):
        q = torch.linalg.qr(gram @ q)[0]
    return torch.linalg.eigvalsh(q.T @ gram @ q)[-RANK:]


def block_krylov(w: torch.Tensor, gram: torch.Tensor, block: int, depth: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(w @ torch.randn(w.shape[1], block, generator=generator))[0]
    blocks = [q]
    for _ in range(depth):
        q = torch.linalg.qr(gram @ q)[0]
        blocks.append(q)
    basis = torch.linalg.qr(torch.cat(blocks, 1))[0]
    return torch.linalg.eigvalsh(basis.T @ gram @ basis)[-RANK:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds each timing runs (median)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--note", default="", help="conditions of the run to state in the report (e.g. the load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [(f"subspace p={p} t={t}", lambda w, g, p=p, t=t: subspace_iteration(w, g, p, t))
               for p, t in ((32, 4), (64, 4), (64, 8))]
    methods += [(f"block Krylov b={b} q={q} ({(q + 1) * b} columns)", lambda w, g, b=b, q=q: block_krylov(w, g, b, q))
                for b, q in ((96, 3), (96, 4), (192, 2))]
    lines = ["# Partial eigensolvers for weighted_lowrank (no omega), 768 x 768, rank 192", "",
             f"{machine_info()['date']}; {machine_info().get('cpu_model', '')}; {args.threads} thread(s); medians "
             f"(torch.utils.benchmark, >= {args.min_run_time} s each). Excess error = captured-energy shortfall relative to the optimal truncation error "
             "(the op's own contract is 1e-5, tests/test_factorization_robustness.py). " + args.note, ""]
    for name, w in matrices().items():
        gram = w @ w.T
        exact = torch.linalg.eigvalsh(gram.double())
        optimal = exact[:-RANK].sum()
        full_eigh = median_ms(lambda: torch.linalg.eigh(gram), args.min_run_time)
        op = median_ms(lambda: torch.ops.lrsparse.weighted_lowrank(w, RANK, None, 50, 1e-6, 0, 8), args.min_run_time)
        svd = median_ms(lambda: torch.linalg.svd(w, full_matrices=False), args.min_run_time)
        gram_ms = median_ms(lambda: w @ w.T, args.min_run_time)
        lines += [f"## {name}", "",
                  f"full SVD {svd:.0f} ms; the op {op:.0f} ms ({svd / op:.2f}x faster than the SVD); inside it the "
                  f"Gram product {gram_ms:.0f} ms and the full eigh {full_eigh:.0f} ms.", "",
                  "| solver (on the Gram matrix) | excess error | ms | vs full eigh |", "|---|---|---|---|"]
        from scipy.linalg import eigh as lapack_eigh
        from threadpoolctl import threadpool_limits

        gram_np = gram.numpy()
        with threadpool_limits(args.threads):
            def partial():
                return torch.from_numpy(lapack_eigh(gram_np, subset_by_index=[768 - RANK, 767], driver="evr",
                                                    eigvals_only=False)[0])

            full_lapack = median_ms(lambda: lapack_eigh(gram_np, driver="evd"), args.min_run_time)
            evr_ms = median_ms(partial, args.min_run_time)
            captured = partial().double().sum()
        lines.append(f"| LAPACK syevr, top {RANK} only (scipy; its full syevd: {full_lapack:.0f} ms) | "
                     f"{float((exact.sum() - captured) / optimal - 1):.1e} | {evr_ms:.0f} | "
                     f"{full_lapack / evr_ms:.2f}x (vs syevd) |")
        for label, solve in methods:
            captured = solve(w, gram).double().sum()
            excess = float((exact.sum() - captured) / optimal - 1)
            ms = median_ms(lambda: solve(w, gram), args.min_run_time)
            lines.append(f"| {label} | {excess:.1e} | {ms:.0f} | {full_eigh / ms:.2f}x |")
        lines.append("")
    lines += ["Reading: on flat spectra (the Gaussian matrix and the real fine-tuned weights) neither iterative solver "
              "gets near 1e-5 excess error before it costs as much as the full eigh, and even the decaying spectrum needs 8 "
              "subspace iterations (slower than the eigh) to reach it. LAPACK's exact partial solver saves only what "
              "follows the tridiagonal reduction. So the op keeps the full eigh.", ""]
    save_report({}, "\n".join(lines), None, args.markdown)


if __name__ == "__main__":
    main()
