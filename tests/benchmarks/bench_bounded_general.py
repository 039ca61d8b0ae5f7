"""Speed of the general bounded projection (Goldfarb-Idnani) on a GP-like problem (issue 13).

RBF covariance on a T x X (t, x) grid plus a relative jitter, one trapezoid row per time frame,
the lower bound 0; the mean is the truth (a front) shifted down with a smooth error, so the bound
binds beyond the front. Prints a table; times are single calls (the machine may be shared: rough).
Run (not collected by pytest)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_bounded_general.py
"""

from __future__ import annotations

import time

import torch

from constraint_layers._bounded import project_bounded

F64 = torch.float64


def problem(T: int, X: int, ls: float, jitter: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 0.5, T, dtype=F64)
    x = torch.linspace(0, 1, X, dtype=F64)
    tt, xx = torch.meshgrid(t, x, indexing="ij")
    p = torch.stack([tt.reshape(-1) / 0.3, xx.reshape(-1) / ls], -1)
    S = torch.exp(-0.5 * torch.cdist(p, p).square()) + jitter * torch.eye(T * X, dtype=F64)
    err = torch.linalg.cholesky(S) @ torch.randn(T * X, generator=gen, dtype=F64)
    truth = (0.3 + 0.4 * tt - xx).clamp_min(0)
    u = (truth + 0.05 * err.reshape(T, X) - 0.02).reshape(-1)
    w = torch.full((X,), 1.0 / (X - 1), dtype=F64)
    w[0] = w[-1] = 0.5 / (X - 1)
    C = torch.block_diag(*[w[None]] * T)
    return u, C, C @ truth.reshape(-1), S


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; single calls (rough)")
    print("| grid | N | x lengthscale | jitter | active | time (s) | max row residual |")
    print("|---|---|---|---|---|---|---|")
    cases = ((11, 201, 0.02, 1e-6), (11, 201, 0.005, 1e-6), (11, 201, 0.002, 1e-4))
    for T, X, ls, jit in cases:
        u, C, d, S = problem(T, X, ls, jit)
        x, t = timed(lambda u=u, C=C, d=d, S=S: project_bounded(u, C, d, covariance=S, lower=0.0))
        res = float((C @ x - d).abs().max())
        print(
            f"| {T} x {X} | {T * X} | {ls} | {jit:g} | {int((x == 0).sum())} | {t:.2f} | "
            f"{res:.1e} |"
        )


if __name__ == "__main__":
    main()
