"""Operator benchmarks: each lrsparse op against the eager PyTorch reference, torch.compile of that reference, and
the machine's own limits (memory copy bandwidth, GEMM throughput) measured in the same run.

    python benchmarks/ops.py --quick --json out.json            # < 3 minutes on 2 cores
    python benchmarks/ops.py --json ops.json --markdown ops.md  # full run, BERT-base and MiniLM shapes

Every time is a median over repeated runs after warm-up (torch.utils.benchmark). `bound_ms` is the time the op would
take at the measured limit: bytes moved / bandwidth for memory-bound ops, flops / GEMM rate for GEMM-bound ones.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lrsparse import ops, reference
from machine import machine_info, measure_bandwidth_gbps, measure_gemm_gflops, median_ms

DEVICE = torch.device("cpu")  # set by --device; every tensor is made there (torch.set_default_device)


class Bench:
    def __init__(self, args):
        self.args = args
        self.results: list[dict] = []
        self.run_time = 0.15 if args.quick else 0.5
        self.bandwidth = measure_bandwidth_gbps(self.run_time)
        # A GPU reaches its GEMM peak only on large products; its bf16 tensor-core rate is the limit that the
        # bf16 training and inference run against. (The CPU build here has no fast bf16 GEMM: not measured there.)
        size = 8192 if DEVICE.type == "cuda" else 2048
        self.gemm = measure_gemm_gflops(self.run_time, torch.float32, size)
        self.gemm_bf16 = measure_gemm_gflops(self.run_time, torch.bfloat16, size) if DEVICE.type == "cuda" else None
        print(f"machine: copy bandwidth {self.bandwidth:.1f} GB/s, GEMM {self.gemm:.1f} GFLOP/s fp32"
              + (f", {self.gemm_bf16:.1f} GFLOP/s bf16" if self.gemm_bf16 else "") + f" ({size}^3)", flush=True)

    def compiled(self, fn):
        return torch.compile(fn, dynamic=False) if not self.args.no_compile else None

    def record(self, op, case, lrsparse_fn, eager_fn, compiled_fn, bound_ms, **extra):
        row = {"op": op, "case": case}
        row["lrsparse_ms"] = median_ms(lrsparse_fn, self.run_time)
        row["eager_ms"] = median_ms(eager_fn, self.run_time) if eager_fn else None
        row["compiled_ms"] = median_ms(compiled_fn, self.run_time) if compiled_fn else None
        row["bound_ms"] = bound_ms
        row.update(extra)
        self.results.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(
            f"{op:24s} {case:34s} lrsparse {fmt(row['lrsparse_ms'])} ms | eager {fmt(row['eager_ms'])} | "
            f"compiled {fmt(row['compiled_ms'])} | bound {fmt(bound_ms)}"
            + "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in extra.items()),
            flush=True,
        )
        return row

    # ---------------------------------------------------------------------------------------------------------
    def accumulate_importance(self):
        shapes = [(768, 3072)] if self.args.quick else [(384, 1536), (768, 768), (768, 3072), (3072, 768)]
        if DEVICE.type == "cuda":
            # Whole-model state far beyond the GPU's L2 cache (50 MB on an H200), so that the bandwidth measured is
            # HBM's: BERT-base's 85M prunable entries are moved in one pass per step like this one tensor.
            shapes = shapes + [(8192, 8192)]
        for (m, n), dtype in [(s, d) for s in shapes for d in (torch.float32, torch.bfloat16)]:
            if self.args.quick and dtype == torch.bfloat16 and DEVICE.type == "cpu":
                continue
            w, g = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype) * 1e-3
            mask = torch.rand(m, n) < 0.5
            ema, unc = torch.rand(m, n), torch.rand(m, n)
            state_bytes = 4 * 2 * 2  # ema and uncertainty read and written
            bytes_moved = m * n * (state_bytes + 2 * w.element_size() + 1)
            ref_ema, ref_unc = ema.clone(), unc.clone()
            eager = lambda: reference.accumulate_importance_(ref_ema, ref_unc, w, g, mask)  # noqa: E731
            compiled_ref = self.compiled(reference.accumulate_importance_)
            comp = (lambda: compiled_ref(ref_ema, ref_unc, w, g, mask)) if compiled_ref else None  # noqa: E731
            self.record(
                "accumulate_importance_",
                f"{m}x{n} {str(dtype).split('.')[-1]} mask",
                lambda: ops.accumulate_importance_(ema, unc, w, g, mask),
                eager,
                comp,
                bytes_moved / (self.bandwidth * 1e9) * 1e3,
            )

    def global_topk_threshold(self):
        # The target size (BERT-base, 85M entries) even in a quick run on a GPU, where it takes milliseconds.
        shapes = _bert_state_shapes(layers=2 if self.args.quick and DEVICE.type == "cpu" else 12)
        ema = [torch.rand(s) for s in shapes]
        unc = [torch.rand(s) for s in shapes]
        masks = [torch.rand(s) < 0.8 for s in shapes]
        live = sum(int(mk.sum()) for mk in masks)
        total = sum(e.numel() for e in ema)
        k = live // 2

        def kthvalue_over_concat():
            scores = torch.cat([(e * u).reshape(-1) for e, u in zip(ema, unc)])
            alive = torch.cat([mk.reshape(-1) for mk in masks])
            return torch.kthvalue(scores[alive], live - k + 1).values

        bytes_moved = total * (4 + 4 + 1)  # one read of ema, uncertainty and mask
        peak = {}
        if not self.args.quick and DEVICE.type == "cpu":  # host RSS of a CPU run; means nothing for device memory
            peak = {
                "peak_mib_lrsparse": _peak_rss_mib("lrsparse", len(shapes)),
                "peak_mib_kthvalue_concat": _peak_rss_mib("kthvalue", len(shapes)),
            }
        self.record(
            "global_topk_threshold",
            f"{len(shapes)} tensors {total / 1e6:.1f}M entries",
            lambda: ops.global_topk_threshold(ema, unc, masks, k),
            kthvalue_over_concat,
            None,
            bytes_moved / (self.bandwidth * 1e9) * 1e3,
            **peak,
        )

    def weighted_lowrank(self):
        def pruned(m: int, n: int) -> torch.Tensor:
            # Pruned like first-order pruning leaves attention/FFN matrices: sparse, with many all-zero rows (their
            # deflation is exact and shrinks the eigenproblem; see csrc/weighted_lowrank_common.cpp).
            generator = torch.Generator(DEVICE).manual_seed(m + n)
            w = _realistic_matrix(m, n) * (torch.rand(m, n, generator=generator) < 0.2)
            w[torch.rand(m, generator=generator) < 0.4] = 0
            return w

        dense_cases = [(384, 1536, 96)] if self.args.quick else [(384, 1536, 96), (768, 768, 192), (768, 3072, 192)]
        pruned_cases = [(384, 384, 14)] if self.args.quick else [(384, 384, 14), (768, 3072, 96)]
        cases = [(f"{m}x{n} r={r} no omega", _realistic_matrix(m, n), r) for m, n, r in dense_cases] + [
            (f"{m}x{n} r={r} no omega, 20% dense, 40% empty rows", pruned(m, n), r) for m, n, r in pruned_cases]
        for label, w, r in cases:
            def full_svd_truncate(w=w, r=r):
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                return u[:, :r] * s[:r], vh[:r]

            U, V = ops.weighted_lowrank(w, r)
            err = float(reference.weighted_error(w, U, V).sqrt())
            err_ref = float(reference.weighted_error(w, *full_svd_truncate()).sqrt())
            self.record(
                "weighted_lowrank",
                label,
                lambda w=w, r=r: ops.weighted_lowrank(w, r),
                full_svd_truncate,
                None,
                _lowrank_gemm_flops(*w.shape, r) / (self.gemm * 1e9) * 1e3,
                error_ratio_vs_svd=err / err_ref,
            )
        cases = [(384, 1536, 48)] if self.args.quick else [(384, 1536, 48), (768, 3072, 96)]
        for m, n, r in cases:
            w = _realistic_matrix(m, n)
            keep = torch.rand(m, n) < 0.25
            w = w * keep
            omega = torch.where(keep, torch.rand(m, n) * 0.5 + 0.5, torch.full((m, n), 0.05))
            iters = 10 if self.args.quick else 30
            # Baseline: EM with a full SVD of the filled matrix each iteration, in the input's dtype (float32), for
            # `iters` iterations. lrsparse is timed at the fewest iterations that reach the baseline's final
            # weighted error (its restricted-basis iterations each improve less), i.e. at equal final error.
            baseline_error = float(reference.weighted_error(w, *em_with_full_svd(w, r, omega, iters), omega))
            lrsparse_iters, error = iters, None
            while lrsparse_iters <= 8 * iters:
                U, V = ops.weighted_lowrank(w, r, omega, max_iters=lrsparse_iters, tol=0.0)
                error = float(reference.weighted_error(w, U, V, omega))
                if error <= baseline_error * (1 + 1e-4):
                    break
                lrsparse_iters += max(1, iters // 5)
            self.record(
                "weighted_lowrank",
                f"{m}x{n} r={r} omega, error of {iters} full-SVD EM iters",
                lambda: ops.weighted_lowrank(w, r, omega, max_iters=lrsparse_iters, tol=0.0),
                lambda: em_with_full_svd(w, r, omega, iters),
                None,
                lrsparse_iters * _lowrank_gemm_flops(m, n, r) / (self.gemm * 1e9) * 1e3,
                lrsparse_em_iters=lrsparse_iters,
                weighted_error_ratio_vs_full_svd_em=error / baseline_error,
            )

    def mixed_rank_linear(self):
        cases = (
            [(1024, 384, 1536, 48)]
            if self.args.quick
            else [(128, 768, 768, 96), (1024, 768, 3072, 192), (8192, 768, 768, 96), (2048, 384, 1536, 48)]
        )
        for tokens, d_in, d_out, r in cases:
            x = torch.randn(tokens, d_in, requires_grad=True)
            U = (torch.randn(d_out, r) / r**0.5).requires_grad_()
            V = (torch.randn(r, d_in) / d_in**0.5).requires_grad_()
            b = torch.zeros(d_out, requires_grad=True)
            mask = torch.rand(d_out, d_in) < 0.25
            ws = (torch.randn(d_out, d_in) * mask / d_in**0.5).requires_grad_()
            grad_out = torch.randn(tokens, d_out)
            alpha = 0.3
            inputs = (x, U, V, b, ws, mask)

            def fwd_bwd(fn):
                def run():
                    y = fn(x, U, V, b, ws, mask, alpha)
                    torch.autograd.grad(y, (x, U, V, b, ws), grad_out)

                return run

            compiled_ref = self.compiled(reference.mixed_rank_linear)
            flops_fwd = 2 * tokens * (d_in * r + r * d_out + d_in * d_out)
            self.record(
                "mixed_rank_linear",
                f"fwd+bwd N={tokens} {d_in}->{d_out} r={r} a={alpha}",
                fwd_bwd(ops.mixed_rank_linear),
                fwd_bwd(reference.mixed_rank_linear),
                fwd_bwd(compiled_ref) if compiled_ref else None,
                3 * flops_fwd / (self.gemm * 1e9) * 1e3,
            )
            del inputs
            # Inference path: low-rank only, against the dense nn.Linear it replaces.
            with torch.no_grad():
                dense = torch.nn.Linear(d_in, d_out)
                xi = torch.randn(tokens, d_in)
                dense_ms = median_ms(lambda: dense(xi), self.run_time)
                ideal = d_in * d_out / (r * (d_in + d_out))
                row = self.record(
                    "mixed_rank_linear",
                    f"inference N={tokens} {d_in}->{d_out} r={r}",
                    lambda: ops.mixed_rank_linear(xi, U.detach(), V.detach(), b.detach()),
                    lambda: reference.mixed_rank_linear(xi, U.detach(), V.detach(), b.detach()),
                    None,
                    2 * tokens * r * (d_in + d_out) / (self.gemm * 1e9) * 1e3,
                    dense_linear_ms=dense_ms,
                    ideal_speedup=ideal,
                )
                row["speedup_vs_dense"] = dense_ms / row["lrsparse_ms"]
                row["fraction_of_ideal_speedup"] = row["speedup_vs_dense"] / ideal


def _bert_state_shapes(layers: int) -> list[tuple[int, int]]:
    """BERT-base target matrices: per layer Q, K, V, attention output (768x768), FFN in (3072x768), out (768x3072)."""
    return [s for _ in range(layers) for s in [(768, 768)] * 4 + [(3072, 768), (768, 3072)]]


def _realistic_matrix(m: int, n: int) -> torch.Tensor:
    """A matrix with the slowly decaying spectrum of a fine-tuned weight (power law plus noise)."""
    gen = torch.Generator(DEVICE).manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.6
    return (u * s) @ v.t() + 0.01 * torch.randn(m, n, generator=gen) / (m * n) ** 0.25


def em_with_full_svd(w: torch.Tensor, rank: int, omega: torch.Tensor, iters: int):
    """The textbook weighted low-rank EM (Srebro & Jaakkola 2003): fill, full thin SVD, truncate, in w's dtype."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    U, V = u[:, :rank] * s[:rank], vh[:rank]
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(omega * w + (1 - omega) * (U @ V), full_matrices=False)
        U, V = u[:, :rank] * s[:rank], vh[:rank]
    return U, V


def _lowrank_gemm_flops(m: int, n: int, r: int) -> float:
    """Lower bound for one rank-r subspace step: two m x n x r products."""
    return 2 * 2 * m * n * r


_PEAK_SNIPPET = textwrap.dedent(
    """
    import resource, sys, torch
    import lrsparse
    from lrsparse import ops
    which, layers = sys.argv[1], int(sys.argv[2]) // 6
    shapes = [s for _ in range(layers) for s in [(768, 768)] * 4 + [(3072, 768), (768, 3072)]]
    ema = [torch.rand(s) for s in shapes]; unc = [torch.rand(s) for s in shapes]
    masks = [torch.rand(s) < 0.8 for s in shapes]
    live = sum(int(m.sum()) for m in masks); k = live // 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if which == "lrsparse":
        ops.global_topk_threshold(ema, unc, masks, k)
    else:
        scores = torch.cat([(e * u).reshape(-1) for e, u in zip(ema, unc)])
        alive = torch.cat([m.reshape(-1) for m in masks])
        torch.kthvalue(scores[alive], live - k + 1)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
)


def _peak_rss_mib(which: str, n_tensors: int) -> float:
    """Extra peak resident memory of one threshold computation, in a fresh process (MiB)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SNIPPET, which, str(n_tensors)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def to_markdown(report: dict) -> str:
    lines = [
        f"# lrsparse operator benchmarks ({report['machine']['date']})",
        "",
        f"Machine: {report['machine'].get('cpu_model', report['machine']['processor'])}, "
        f"{report['machine']['threads']} threads, torch {report['machine']['torch']}. Measured in the same run: "
        f"copy bandwidth {report['bandwidth_gbps']:.1f} GB/s (read + write), GEMM {report['gemm_gflops']:.1f} GFLOP/s"
        + (f" fp32, {report['gemm_bf16_gflops']:.1f} GFLOP/s bf16." if report.get("gemm_bf16_gflops") else "."),
        "",
        "| op | case | lrsparse ms | eager ms | compiled ms | bound ms | eager / lrsparse | lrsparse / bound | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {"op", "case", "lrsparse_ms", "eager_ms", "compiled_ms", "bound_ms"}
    for r in report["results"]:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        speed = "-" if r["eager_ms"] is None else f"{r['eager_ms'] / r['lrsparse_ms']:.2f}x"
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in base)
        lines.append(
            f"| {r['op']} | {r['case']} | {f(r['lrsparse_ms'])} | {f(r['eager_ms'])} | {f(r['compiled_ms'])} | "
            f"{f(r['bound_ms'])} | {speed} | {r['lrsparse_ms'] / r['bound_ms']:.2f} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one case per op (< 3 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write a markdown table here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--only", nargs="*", help="run only these ops")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the ops, their references and the machine limits run (default: cpu)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not (torch.cuda.is_available() and ops.BUILD_INFO["cuda"]):
        parser.error(f"--device cuda needs a visible GPU (torch.cuda.is_available() is {torch.cuda.is_available()}) "
                     f"and lrsparse built with CUDA kernels (BUILD_INFO['cuda'] is {ops.BUILD_INFO['cuda']})")
    # Default device rather than a device= on every factory call: the machine limits, the inputs and the
    # references' temporaries all land on the benchmarked device.
    torch.set_default_device(DEVICE)
    torch.manual_seed(0)
    bench = Bench(args)
    report = {
        "machine": machine_info(),
        "bandwidth_gbps": bench.bandwidth,
        "gemm_gflops": bench.gemm,
        "gemm_bf16_gflops": bench.gemm_bf16,
        "quick": args.quick,
        "results": bench.results,
    }
    for name in ["accumulate_importance", "global_topk_threshold", "weighted_lowrank", "mixed_rank_linear"]:
        if args.only and name not in args.only:
            continue
        getattr(bench, name)()
        # Written after every op, so that a run stopped at a time limit keeps what it measured.
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
