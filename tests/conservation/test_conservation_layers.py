"""ConservationProjection on every kind of model output, through the shared test mixin."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.adapters.generic import read_gaussian
from constraint_layers.testing import ConservationLayerTests

F64 = torch.float64


def flat(t):
    return t.reshape(t.shape[0], -1)


class _Reference(ConservationLayerTests):
    """Reference: the dense formulas on the raw model output, flattened per sample."""

    def reference(self, model, x):
        g = read_gaussian(model(x))
        G, b = self.dense_rows(g.mean.shape, x)
        var = None if g.variance is None else flat(g.variance)
        mean, cov = self.dense_update(flat(g.mean), G, b, variance=var)
        out_var = None if cov is None else cov.diagonal(dim1=-2, dim2=-1).reshape(g.mean.shape)
        return mean.reshape(g.mean.shape), out_var


class TestDeterministicGrid(_Reference):
    """A plain grid model: the Euclidean (HardC) projection; total a callable of the input."""

    def make_model(self, dtype):
        return nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2), nn.Tanh(), nn.Conv1d(8, 1, 5, padding=2)
        ).to(dtype)

    def make_constraints(self):
        return cl.Conservation.integral(lambda x: x[:, :1].mean(-1), rule="simpson", extent=2.0)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 2, 33, dtype=dtype)


class VarianceHead(nn.Module):
    def __init__(self, out=1):
        super().__init__()
        self.body = nn.Conv2d(1, 2 * out, 3, padding=1)

    def forward(self, x):
        h = self.body(x)
        k = h.shape[1] // 2
        return h[:, :k], nn.functional.softplus(h[:, k:]) + 0.05


class TestVarianceHeadPerFrame(_Reference):
    """(mean, variance) on a (batch, 1, x, t) grid: one row per time frame, a total per frame."""

    def make_model(self, dtype):
        return VarianceHead().to(dtype)

    def make_constraints(self):
        inner = torch.rand(15, generator=torch.Generator().manual_seed(1)).sort().values
        x = torch.cat([torch.zeros(1), inner, torch.ones(1)])  # a non-uniform grid on [0, 1]
        return cl.Conservation.integral(torch.linspace(-1, 1, 6), dim=0, grid=x.double())

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 17, 6, dtype=dtype)


class DictHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 24)

    def forward(self, x):
        h = self.lin(x)
        return {"mean": h[:, :12], "std": torch.exp(0.3 * h[:, 12:]), "extra": "kept"}


class TestDictHeadJoint(_Reference):
    """A dict with a standard deviation, flat outputs, two constraints enforced jointly."""

    def make_model(self, dtype):
        return DictHead().to(dtype)

    def make_constraints(self):
        g = torch.Generator().manual_seed(5)
        G = torch.randn(12, dtype=F64, generator=g)
        return [cl.Conservation.integral(0.5), cl.Conservation(G, 1.0)]

    def make_input(self, batch, dtype):
        return torch.randn(batch, 4, dtype=dtype)

    def test_dict_comes_back(self):
        _model, layer, x = self.build()
        out = layer(x)
        assert set(out) == {"mean", "std", "extra"} and out["extra"] == "kept"


class NormalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv1d(1, 4, 3, padding=1)

    def forward(self, x):
        h = self.body(x)
        return torch.distributions.Normal(h[:, :2], nn.functional.softplus(h[:, 2:]) + 0.1)


class TestNormalHeadChannels(_Reference):
    """A Normal over two channels; only channel 1 is conserved (channel 0 is left untouched)."""

    def make_model(self, dtype):
        return NormalHead().to(dtype)

    def make_constraints(self):
        return cl.Conservation.integral(1.0, channels=[1])

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 20, dtype=dtype)

    def test_other_channel_untouched(self):
        model, layer, x = self.build()
        with torch.no_grad():
            out, raw = layer(x), model(x)
        assert isinstance(out, torch.distributions.Normal)
        assert torch.equal(out.loc[:, 0], raw.loc[:, 0])
        assert torch.equal(out.scale[:, 0], raw.scale[:, 0])


class TestEnsembleOfGaussians(ConservationLayerTests):
    """A deep ensemble of variance heads: each member conditioned, then moment-matched."""

    def make_model(self, dtype):
        return cl.adapters.Ensemble([VarianceHead().to(dtype) for _ in range(3)])

    def make_constraints(self):
        return cl.Conservation.integral(0.0, dim=1)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 9, 11, dtype=dtype)

    def reference(self, model, x):
        means, variances = [], []
        for m in model.members:
            mu, var = m(x)
            G, b = self.dense_rows(mu.shape, x)
            pm, pc = self.dense_update(flat(mu), G, b, variance=flat(var))
            means.append(pm)
            variances.append(pc.diagonal(dim1=-2, dim2=-1))
        m, v = torch.stack(means), torch.stack(variances)
        shape = mu.shape
        return m.mean(0).reshape(shape), (v.mean(0) + m.var(0, unbiased=False)).reshape(shape)


class TestEnsembleOfPoints(ConservationLayerTests):
    """Point-prediction members: moment-matched first, the diagonal Gaussian conditioned."""

    def make_model(self, dtype):
        return cl.adapters.Ensemble([nn.Conv1d(1, 1, 3, padding=1).to(dtype) for _ in range(4)])

    def make_constraints(self):
        return cl.Conservation.integral(2.0)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 15, dtype=dtype)

    def reference(self, model, x):
        ys = torch.stack([m(x) for m in model.members])
        mu, var = ys.mean(0), ys.var(0, unbiased=False)
        G, b = self.dense_rows(mu.shape, x)
        m, c = self.dense_update(flat(mu), G, b, variance=flat(var))
        return m.reshape(mu.shape), c.diagonal(dim1=-2, dim2=-1).reshape(mu.shape)


def test_ensemble_modes_and_mc_dropout():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(1, 8, 3, padding=1), nn.Dropout(0.3), nn.Conv1d(8, 1, 3, padding=1)
    )
    net.eval()
    ens = cl.adapters.Ensemble(net, passes=16)
    model = cl.wrap(ens, cl.Conservation.integral(0.0))
    mean, var = model(torch.randn(3, 1, 21))
    assert float(cl.metrics.conservation_error(mean, model.constraints[0]).abs().max()) < 1e-5
    assert float(var.detach().min()) > 0  # dropout was active
    assert not net[1].training  # and is switched back off

    class Latent(nn.Module):  # a neural process: samples along axis 0 of both outputs
        def forward(self, x):
            return x.unsqueeze(0) + torch.arange(5.0).reshape(5, 1, 1, 1), torch.ones(5, *x.shape)

    lat = cl.wrap(cl.adapters.Ensemble(Latent(), sample_dim=0), cl.Conservation.integral(1.0))
    mean, var = lat(torch.zeros(2, 1, 11))
    members = torch.arange(5.0).reshape(5, 1, 1).expand(5, 2, 11)
    w = cl.quadrature.trapezoid(11)
    mix = cl.functional.conserve_mixture(members, w, 1.0, variances=torch.ones(5, 2, 11))
    torch.testing.assert_close(mean[:, 0], mix.mean)
    torch.testing.assert_close(var[:, 0], mix.variance)
    with pytest.raises(ValueError, match="exactly one of passes"):
        cl.adapters.Ensemble(net)
    with pytest.raises(ValueError, match="update must be one of"):
        cl.adapters.Ensemble([net], update="mean")


def test_ensemble_members_update_on_points_is_hardc_per_member():
    nets = [nn.Conv1d(1, 1, 3, padding=1) for _ in range(3)]
    x = torch.randn(2, 1, 13)
    c = cl.Conservation.integral(0.0)
    mean, _var = cl.wrap(cl.adapters.Ensemble(nets, update="members"), c)(x)
    proj = [cl.functional.enforce_conservation(n(x), c).mean for n in nets]
    torch.testing.assert_close(mean, torch.stack(proj).mean(0), rtol=1e-6, atol=1e-6)


def test_normalizer_physical_units():
    class Norm:
        def __init__(self):
            self.mean, self.std = torch.tensor(3.0), torch.tensor(2.0)

        def transform(self, u):
            return (u - self.mean) / self.std

        def inverse_transform(self, u):
            return u * self.std + self.mean

    class Holder:
        out_normalizer = None

    holder = Holder()
    torch.manual_seed(0)
    head = VarianceHead().double()
    model = cl.wrap(head, cl.Conservation.integral(5.0, dim=0), normalizer=holder)
    holder.out_normalizer = Norm()  # fitted after wrapping: read at call time
    x = torch.randn(2, 1, 9, 4, dtype=F64)
    mean_n, var_n = model(x)
    phys = Norm().inverse_transform(mean_n)
    err = cl.metrics.conservation_error(phys, model.constraints[0])
    assert float(err.abs().max()) < 1e-12
    mu, var = head(x)  # reference: condition in physical units
    ref = cl.functional.enforce_conservation(3 + 2 * mu, model.constraints[0], variance=4 * var)
    torch.testing.assert_close(var_n, ref.variance / 4)
    torch.testing.assert_close(mean_n, (ref.mean - 3) / 2)


def test_wrap_dispatch_options_and_debug():
    net = nn.Conv1d(1, 1, 3, padding=1)
    c = cl.Conservation.integral(0.0)
    layer = cl.wrap(net, c, noise=0.1, debug=True)
    assert isinstance(layer, cl.ConservationProjection) and layer.noise == 0.1
    assert "noise=0.1" in repr(layer)
    exact = cl.wrap(net, c, debug=True)
    y = exact(torch.randn(2, 1, 12))
    assert float(cl.metrics.conservation_error(y, c).abs().max()) < 1e-6
    joint = cl.wrap(net, c, cl.Dirichlet(0.0))  # both families: one joint layer
    assert type(joint) is cl.ConstraintLayer and len(joint.bcs) == 1


def test_posterior_sampling_through_the_layer():
    torch.manual_seed(0)
    head = VarianceHead().double()
    layer = cl.wrap(head, cl.Conservation.integral(0.0, dim=0))
    x = torch.randn(1, 1, 12, 3, dtype=F64)
    post = layer.posterior(x)
    with torch.no_grad():
        s = post.sample(64, generator=torch.Generator().manual_seed(0))
    G, b = cl.Conservation.integral(0.0, dim=0).dense((1, 1, 12, 3))
    assert float((s @ G.mT - b).abs().max()) < 1e-12
    mean, _ = layer(x)
    torch.testing.assert_close(post.mean.reshape(mean.shape), mean)


def test_training_through_the_wrapper():
    torch.manual_seed(0)
    head = VarianceHead()
    layer = cl.wrap(head, cl.Conservation.integral(0.0, dim=0))
    opt = torch.optim.Adam(layer.parameters(), 1e-2)
    x = torch.randn(4, 1, 16, 5)
    target = torch.sin(math.pi * torch.linspace(0, 2, 16)).reshape(1, 1, 16, 1).expand(4, 1, 16, 5)
    first = None
    for _ in range(30):
        mean, var = layer(x)
        loss = (0.5 * (mean - target) ** 2 / var + 0.5 * var.log()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_multi_axis_integral_and_rules_match_dense():
    """A 2-D domain per time frame (tensor-product Simpson x trapezoid), against the rows."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 1, 7, 6, 3, dtype=F64, generator=g)  # (B, C, x, y, t)
    var = torch.rand(2, 1, 7, 6, 3, dtype=F64, generator=g) + 0.1
    c = cl.Conservation.integral(
        torch.tensor([1.0, 0.0, -1.0]), dim=(0, 1), rule=("simpson", "right"), extent=(2.0, 1.0)
    )
    out = cl.functional.enforce_conservation(mean, c, variance=var)
    G, b = c.dense(mean.shape)
    assert G.shape == (3, 7 * 6 * 3) and b.shape == (2, 3)
    ref, cov = ConservationLayerTests.dense_update(flat(mean), G, b, variance=flat(var))
    torch.testing.assert_close(flat(out.mean), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat(out.variance), cov.diagonal(dim1=-2, dim2=-1))
    assert float(cl.metrics.conservation_error(out.mean, c).abs().max()) < 1e-13
    w = cl.quadrature.tensor_product(
        cl.quadrature.simpson(7, extent=2.0), cl.quadrature.right_riemann(6)
    )
    torch.testing.assert_close(G[0].reshape(7, 6, 3)[..., 0], w)


def test_layer_noise_and_euclidean_metric():
    torch.manual_seed(0)
    head = VarianceHead().double()
    x = torch.randn(2, 1, 9, 4, dtype=F64)
    c = cl.Conservation.integral(0.0, dim=0)
    mean0, var0 = head(x)
    hardc_mean, hardc_var = cl.wrap(head, c, metric="euclidean")(x)
    assert torch.equal(hardc_var, var0)  # HardC: the variance as given
    proj = cl.functional.enforce_conservation(mean0, c)  # deterministic: the same projection
    torch.testing.assert_close(hardc_mean, proj.mean)
    soft_mean, soft_var = cl.wrap(head, c, noise=1e-2)(x)
    exact_mean, _ = cl.wrap(head, c)(x)
    ce_soft = cl.metrics.conservation_error(soft_mean, c).abs().max()
    ce_raw = cl.metrics.conservation_error(mean0, c).abs().max()
    assert 1e-12 < float(ce_soft) < float(ce_raw)  # noise > 0: close, not exact
    assert bool((soft_var <= var0 + 1e-15).all())
    loose, _ = cl.wrap(head, c, noise=float("inf"))(x)
    torch.testing.assert_close(loose, mean0)
    del exact_mean
