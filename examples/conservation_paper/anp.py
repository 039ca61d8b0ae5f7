"""The attentive neural process (ANP) black box of the conservation paper, written from its
description (Kim et al., ICLR 2019; Hansen et al., ICML 2023, Appendix).

A map from a context set ``{(t_i, x_i, u_i)}`` of one function to a Gaussian ``N(mean, std^2)``
of ``u`` at any target ``(t, x)``:

- latent path: ``(t, x, u)`` -> Linear -> 2 self-attention blocks -> mean pool -> ``q(z | C)``
  (128-d Gaussian, std ``0.1 + 0.9 sigmoid``);
- deterministic path: ``(t, x, u)`` -> Linear -> 2 self-attention blocks -> values of 2
  cross-attention blocks queried by the target coordinates -> ``r(t, x)``;
- decoder: ``[r, z, embed(t, x)]`` (3 x 128 = 384) -> 3 x (Linear(384) + ReLU) -> mean and
  ``softplus + 1e-3`` standard deviation.

Hidden size 128 and 4 heads give about 1.1e6 parameters. Dropout (inside the attention blocks) is
active in training only: :meth:`ANP.predict` switches the model to eval mode.

A fixed affine map of ``(t, x)`` to ``[0, 1]^2`` (the problem's time range and domain) precedes
both paths; it is part of the model, not of the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ANP", "ANPGrid", "count_parameters"]


class AttentionBlock(nn.Module):
    """Multi-head attention with residual and layer norm, then a feed-forward sublayer with
    residual and layer norm (scaled dot-product attention kernels of torch)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)

    def _split(self, x: Tensor) -> Tensor:  # (B, N, H) -> (B, heads, N, H / heads)
        b, n, h = x.shape
        return x.reshape(b, n, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: (B, Nq, H); k, v: (B, Nk, H) -> (B, Nq, H)
        h = q.shape[-1]
        wk, wv = self.kv.weight.split(h), self.kv.bias.split(h)
        key = F.linear(k, wk[0], wv[0])
        val = F.linear(v, wk[1], wv[1])
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(
            self._split(self.q(q)), self._split(key), self._split(val), dropout_p=p
        )
        a = self.out(a.transpose(1, 2).reshape(q.shape))
        a = F.dropout(a, p, self.training)
        x = self.norm1(q + a)
        return self.norm2(x + F.dropout(self.ff(x), p, self.training))


class ANP(nn.Module):
    """Attentive neural process over ``(t, x) -> u``.

    Parameters
    ----------
    t_range, domain : (float, float)
        The problem's time range and spatial domain (for the fixed input scaling).
    hidden : int, default 128
    heads : int, default 4
    dropout : float, default 0.1
        In the attention blocks, training only.
    """

    def __init__(
        self,
        t_range: tuple[float, float],
        domain: tuple[float, float],
        *,
        hidden: int = 128,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        lo = torch.tensor([t_range[0], domain[0]])
        width = torch.tensor([t_range[1] - t_range[0], domain[1] - domain[0]])
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("width", width, persistent=False)
        self.hidden = hidden
        self.embed_xy_latent = nn.Linear(3, hidden)
        self.embed_xy_det = nn.Linear(3, hidden)
        self.embed_x = nn.Linear(2, hidden)  # queries and keys of the cross-attention
        self.latent_sa = nn.ModuleList([AttentionBlock(hidden, heads, dropout) for _ in range(2)])
        self.det_sa = nn.ModuleList([AttentionBlock(hidden, heads, dropout) for _ in range(2)])
        self.cross = nn.ModuleList([AttentionBlock(hidden, heads, dropout) for _ in range(2)])
        self.latent_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * hidden)
        )
        d = 3 * hidden
        self.decoder = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(),
            nn.Linear(d, 2),
        )  # fmt: skip

    # ------------------------------------------------------------------------------ paths
    def _scale(self, x: Tensor) -> Tensor:
        return (x - self.lo.to(x.dtype)) / self.width.to(x.dtype)

    def latent(self, x: Tensor, y: Tensor) -> torch.distributions.Normal:
        """``q(z | {(x, y)})``; x: (B, N, 2), y: (B, N, 1) -> loc, scale (B, hidden)."""
        h = self.embed_xy_latent(torch.cat([self._scale(x), y], -1))
        for block in self.latent_sa:
            h = block(h, h, h)
        mu, raw = self.latent_head(h.mean(1)).chunk(2, -1)
        return torch.distributions.Normal(mu, 0.1 + 0.9 * torch.sigmoid(raw))

    def deterministic(self, cx: Tensor, cy: Tensor, tx: Tensor) -> Tensor:
        """``r`` at the targets; cx: (B, N, 2), cy: (B, N, 1), tx: (B, T, 2) -> (B, T, hidden)."""
        v = self.embed_xy_det(torch.cat([self._scale(cx), cy], -1))
        for block in self.det_sa:
            v = block(v, v, v)
        k = self.embed_x(self._scale(cx))
        q = self.embed_x(self._scale(tx))
        for block in self.cross:
            q = block(q, k, v)
        return q

    def decode(self, r: Tensor, z: Tensor, tx: Tensor) -> tuple[Tensor, Tensor]:
        """r: (B, T, H), z: (S, B, H), tx: (B, T, 2) -> mean, std (S, B, T)."""
        e = self.embed_x(self._scale(tx))
        # the first layer split by input block: [r, z, e] W = r W_r + z W_z + e W_e
        first = self.decoder[0]
        h = self.hidden
        w_r, w_z, w_e = first.weight[:, :h], first.weight[:, h : 2 * h], first.weight[:, 2 * h :]
        pre = (r @ w_r.T + e @ w_e.T + first.bias).unsqueeze(0) + (z @ w_z.T).unsqueeze(2)
        out = self.decoder[1:](pre)
        mean, raw = out.unbind(-1)
        return mean, F.softplus(raw) + 1e-3

    # ----------------------------------------------------------------------------- calls
    def forward(
        self,
        context_x: Tensor,
        context_y: Tensor,
        target_x: Tensor,
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Gaussians at the targets for ``num_samples`` latent samples of ``q(z | C)``.

        Shapes: context_x (B, Nc, 2), context_y (B, Nc, 1), target_x (B, Nt, 2). Returns mean
        and std, each (S, B, Nt). Dropout follows the module's mode (see :meth:`predict`).
        """
        prior = self.latent(context_x, context_y)
        eps = torch.randn(
            (num_samples, *prior.loc.shape),
            dtype=prior.loc.dtype,
            device=prior.loc.device,
            generator=generator,
        )
        z = prior.loc + prior.scale * eps
        return self.decode(self.deterministic(context_x, context_y, target_x), z, target_x)

    @torch.no_grad()
    def predict(
        self,
        context_x: Tensor,
        context_y: Tensor,
        target_x: Tensor,
        *,
        num_samples: int = 100,
        generator: torch.Generator | None = None,
        chunk: int = 1 << 16,
    ) -> tuple[Tensor, Tensor]:
        """Latent-sample Gaussians at the targets, in eval mode (dropout off).

        Returns mean and variance of shape (S, B, Nt): S latent samples of ``q(z | C)``, shared
        by all targets of a function (targets are processed in chunks of about ``chunk``
        (point, sample) pairs per function).
        """
        was = self.training
        self.eval()
        try:
            prior = self.latent(context_x, context_y)
            eps = torch.randn(
                (num_samples, *prior.loc.shape),
                dtype=prior.loc.dtype,
                device=prior.loc.device,
                generator=generator,
            )
            z = prior.loc + prior.scale * eps
            means, variances = [], []
            step = max(1, chunk // max(num_samples, 1))
            for i in range(0, target_x.shape[1], step):
                tx = target_x[:, i : i + step]
                m, s = self.decode(self.deterministic(context_x, context_y, tx), z, tx)
                means.append(m)
                variances.append(s.square())
            return torch.cat(means, -1), torch.cat(variances, -1)
        finally:
            self.train(was)

    def loss(
        self, cx: Tensor, cy: Tensor, tx: Tensor, ty: Tensor, *, extra_x: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Negative ELBO per target point, ``-mean log N(y | mean, std^2) + KL(q(z | C u T) ||
        q(z | C)) / |C u T|`` (the likelihood over the context and the target points), with one
        posterior latent sample.

        Shapes: cx (B, Nc, 2), cy (B, Nc, 1), tx (B, Nt, 2), ty (B, Nt, 1); ``extra_x``
        (B, Ne, 2): more query points decoded with the same latent sample (for a penalty).
        Returns the loss and the mean at ``extra_x`` (B, Ne) (or None).
        """
        x = torch.cat([cx, tx], 1)
        y = torch.cat([cy, ty], 1)
        prior = self.latent(cx, cy)
        post = self.latent(x, y)
        z = post.rsample((1,))
        q = x if extra_x is None else torch.cat([x, extra_x], 1)
        mean, std = self.decode(self.deterministic(cx, cy, q), z, q)
        n = x.shape[1]
        dist = torch.distributions.Normal(mean[0, :, :n], std[0, :, :n])
        nll = -dist.log_prob(y[..., 0]).mean(-1)
        kl = torch.distributions.kl_divergence(post, prior).sum(-1) / n
        extra = None if extra_x is None else mean[0, :, n:]
        return (nll + kl).mean(), extra


class ANPGrid(nn.Module):
    """An ANP evaluated on a ``(t, x)`` grid for a batch of functions: the black box as a user
    would hand it to :class:`constraint_layers.adapters.Ensemble` (latent samples on axis 0).

    ``forward(context_x, context_y)`` returns ``(mean, variance)`` of shape
    (S, batch, 1, T, X): S latent samples of a channel-first (batch, 1, T, X) grid.
    """

    def __init__(
        self,
        anp: ANP,
        grid_t: Tensor,
        grid_x: Tensor,
        *,
        num_samples: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.anp = anp
        self.register_buffer("grid_t", grid_t, persistent=False)
        self.register_buffer("grid_x", grid_x, persistent=False)
        self.num_samples = num_samples
        self.seed = seed

    def points(self, batch: int) -> Tensor:
        """The grid points, time-major: shape (batch, T * X, 2)."""
        tt, xx = torch.meshgrid(self.grid_t, self.grid_x, indexing="ij")
        return torch.stack([tt, xx], -1).reshape(1, -1, 2).expand(batch, -1, -1)

    def forward(self, context_x: Tensor, context_y: Tensor) -> tuple[Tensor, Tensor]:
        b = context_x.shape[0]
        gen = torch.Generator(device=context_x.device).manual_seed(self.seed)
        mean, var = self.anp.predict(
            context_x,
            context_y,
            self.points(b).to(context_x),
            num_samples=self.num_samples,
            generator=gen,
        )
        shape = (self.num_samples, b, 1, len(self.grid_t), len(self.grid_x))
        return mean.reshape(shape), var.reshape(shape)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
