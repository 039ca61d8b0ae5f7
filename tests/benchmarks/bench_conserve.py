"""Speed of conserve(): diagonal path against N and M, full path up to N = 4096.

Each row is measured in the same run against a naive dense implementation of the formulas (the
N x N covariance, an explicit gain matrix) and against a memory-bound copy of the same bytes
(``clone()`` of the inputs that must be read: the lower bound of any implementation that reads
them and writes the result once). Target for the diagonal path: within 3x of the copy.

Run (not collected by pytest)::

    .venv/bin/python tests/benchmarks/bench_conserve.py            # the full table
    .venv/bin/python tests/benchmarks/bench_conserve.py --quick    # smaller sizes
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

import constraint_layers as cl

F64 = torch.float64


def best_time(repeats: int, fn, *args, budget: float = 20.0, **kwargs) -> float:
    """Best wall time per call of ``fn(*args, **kwargs)`` in seconds: calls are grouped so that
    one measurement lasts at least 20 ms (as ``timeit``), best of ``repeats`` measurements."""
    t0 = time.perf_counter()
    fn(*args, **kwargs)  # warm-up
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(0.02 / once))
    best, start = math.inf, time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args, **kwargs)
        best = min(best, (time.perf_counter() - t0) / number)
        if time.perf_counter() - start > budget:
            break
    return best


def copy(*tensors):
    """The memory-bound baseline: read the tensors and write a copy of each once."""
    return [t.clone() for t in tensors]


conserve = cl.functional.condition_gaussian  # the conditioning kernel (formerly conserve)


def naive(mean, G, b, cov):
    """The formulas with dense matrices: A = G S G^T, K = S G^T A^{-1}, S~ = S - K G S."""
    mu, S, G, b = mean.to(F64), cov.to(F64), G.to(F64), b.to(F64)
    A = G @ S @ G.mT
    K = torch.linalg.solve(A, G @ S).mT
    new_mean = mu - (K @ (G @ mu.unsqueeze(-1) - b.unsqueeze(-1))).squeeze(-1)
    new_cov = S - K @ (G @ S)
    return new_mean.to(mean.dtype), new_cov.diagonal(dim1=-2, dim2=-1).to(mean.dtype)


def residual(post_mean, G, b) -> float:
    r = post_mean.to(F64) @ G.to(F64).mT - b.to(F64)
    return float(r.abs().max() / (b.abs().max() + (G.abs() @ post_mean.abs().T).max()))


def fmt(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3f}" if t < 1e-2 else f"{t * 1e3:.1f}"


def problem(n, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, n, generator=g, dtype=dtype)
    var = torch.rand(1, n, generator=g, dtype=dtype) + 0.1
    if m == 1:
        G = torch.full((1, n), 1.0 / n, dtype=dtype)  # a quadrature row
    else:
        G = torch.randn(m, n, generator=g, dtype=dtype) / n
    b = torch.randn(1, m, generator=g, dtype=dtype)
    return mean, var, G, b


def table_diagonal_n(sizes, dtype, repeats, dense_max):
    print(f"\n### Diagonal path against N (M = 1, {dtype}, one sample)")
    print("| N | copy ms | conserve ms | conserve / copy | naive dense ms | residual |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        mean, var, G, b = problem(n, 1, dtype)
        with torch.no_grad():
            t_copy = best_time(repeats, copy, mean, var)
            t_ours = best_time(repeats, conserve, mean, G, b, variance=var)
            res = residual(conserve(mean, G, b, variance=var).mean, G, b)
            t_dense = None
            if n <= dense_max:
                t_dense = best_time(repeats, naive, mean, G, b, torch.diag_embed(var))
        print(
            f"| {n:.0e} | {fmt(t_copy)} | {fmt(t_ours)} | {t_ours / t_copy:.2f} | "
            f"{fmt(t_dense)} | {res:.1e} |"
        )


def table_diagonal_m(n, ms, dtype, repeats):
    print(f"\n### Diagonal path against M (N = {n}, {dtype}, one sample)")
    print("| M | copy ms | conserve ms | conserve / copy | naive dense ms | dense / conserve |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in ms:
        mean, var, G, b = problem(n, m, dtype)
        with torch.no_grad():
            t_copy = best_time(repeats, copy, mean, var, G)
            t_ours = best_time(repeats, conserve, mean, G, b, variance=var)
            t_dense = best_time(repeats, naive, mean, G, b, torch.diag_embed(var))
        print(
            f"| {m} | {fmt(t_copy)} | {fmt(t_ours)} | {t_ours / t_copy:.2f} | {fmt(t_dense)} | "
            f"{t_dense / t_ours:.1f} |"
        )


def table_full(sizes, ms, dtype, repeats):
    print(f"\n### Full covariance path ({dtype}, one sample)")
    print("| N | M | copy of Sigma ms | conserve ms | naive dense ms | dense / conserve |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        g = torch.Generator().manual_seed(1)
        X = torch.randn(n, n // 4, generator=g, dtype=dtype)
        S = (X @ X.mT / (n // 4) + 0.1 * torch.eye(n, dtype=dtype)).unsqueeze(0)
        for m in ms:
            mean, _, G, b = problem(n, m, dtype)
            with torch.no_grad():
                t_copy = best_time(repeats, copy, S)
                t_ours = best_time(repeats, conserve, mean, G, b, covariance=S)
                t_dense = best_time(repeats, naive, mean, G, b, S)
            print(
                f"| {n} | {m} | {fmt(t_copy)} | {fmt(t_ours)} | {fmt(t_dense)} | "
                f"{t_dense / t_ours:.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about 10 s)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); times: best of {args.repeats}"
    )
    dtypes = (
        [torch.float32, torch.float64] if args.dtype == "both" else [getattr(torch, args.dtype)]
    )
    sizes = [10**3, 10**4, 10**5, 10**6] + ([] if args.quick else [10**7])
    for dt in dtypes:
        table_diagonal_n(sizes, dt, args.repeats, dense_max=4096)
    table_diagonal_m(
        4096, [1, 10, 100] + ([] if args.quick else [1000]), torch.float64, args.repeats
    )
    full = [256, 1024] + ([] if args.quick else [4096])
    table_full(full, [1, 16], torch.float64, args.repeats)


if __name__ == "__main__":
    main()
