"""Tiny models for the tests (built inside the tests, seeded, fast on 2 CPU cores)."""

from __future__ import annotations

import warnings

import torch


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast real tensors to ``dtype`` and complex ones to the matching complex dtype.

    ``Module.to(torch.float64)`` leaves neuraloperator's complex spectral weights in complex64.
    """
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.to(cdtype if t.is_complex() else dtype)
    return model


def fno(n_modes, in_channels=1, out_channels=1, hidden=8, dtype=torch.float32, **kw):
    from neuralop.models import FNO

    return to_dtype(FNO(n_modes=n_modes, in_channels=in_channels, out_channels=out_channels,
                        hidden_channels=hidden, **kw), dtype)  # fmt: skip


def tfno(n_modes, in_channels=1, out_channels=1, hidden=8, dtype=torch.float32, **kw):
    from neuralop.models import TFNO

    return to_dtype(TFNO(n_modes=n_modes, in_channels=in_channels, out_channels=out_channels,
                         hidden_channels=hidden, **kw), dtype)  # fmt: skip


def uno(in_channels=1, out_channels=1, dtype=torch.float32):
    from neuralop.models import UNO

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        model = UNO(in_channels, out_channels, 8, lifting_channels=8, projection_channels=8,
                    n_layers=3, uno_out_channels=[8, 8, 8], uno_n_modes=[[4], [4], [4]],
                    uno_scalings=[[1.0], [0.5], [2.0]], channel_mlp_skip="linear")  # fmt: skip
    return to_dtype(model, dtype)


class _quiet:
    """UNO prints its skip settings; keep the test log clean."""

    def __enter__(self):
        import contextlib
        import io

        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


class complex128_spectral:
    """Within this block neuraloperator's ``SpectralConv`` computes in complex128 when its
    weights do (it allocates its output spectrum as complex64 whatever the weights): float64
    models become exact to float64 rounding, for tests of the refinement at 1e-10."""

    def __enter__(self):
        from neuralop.layers import spectral_convolution as sc

        self._module, self._torch = sc, sc.torch
        real = sc.torch

        class _Torch:
            def __getattr__(self, name):
                return getattr(real, name)

            def zeros(self, *args, dtype=None, **kwargs):
                return real.zeros(*args, dtype=real.cdouble if dtype == real.cfloat else dtype,
                                  **kwargs)  # fmt: skip

        sc.torch = _Torch()
        return self

    def __exit__(self, *exc):
        self._module.torch = self._torch
        return False
