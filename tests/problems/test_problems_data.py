"""Generation plumbing shared by every reference problem: seeds, cache, layout, datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from constraint_layers.problems import (
    Burgers,
    CacheError,
    Cavity,
    Heat,
    OperatorData,
    OperatorDataset,
    Stokes,
    add_coordinates,
    resolve_cache_dir,
)
from constraint_layers.problems import cache as cache_mod

# small, fast configurations of every reference problem
PROBLEMS = [
    pytest.param(lambda: Heat(), {"resolution": 33}, id="heat"),
    pytest.param(lambda: Stokes(), {"resolution": 33}, id="stokes"),
    pytest.param(lambda: Burgers(), {"resolution": 33}, id="burgers-periodic"),
    pytest.param(lambda: Burgers(bc="dirichlet"), {"resolution": 33}, id="burgers-dirichlet"),
    pytest.param(lambda: Cavity(), {"resolution": 9}, id="cavity"),
]


@pytest.mark.parametrize(("make", "kwargs"), PROBLEMS)
def test_seeds_reproduce_bit_for_bit(make, kwargs):
    a = make().generate(3, seed=7, cache=False, dtype=torch.float64, **kwargs)
    b = make().generate(3, seed=7, cache=False, dtype=torch.float64, **kwargs)
    c = make().generate(3, seed=8, cache=False, dtype=torch.float64, **kwargs)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key])
    for key in a.boundary:
        assert torch.equal(a.boundary[key], b.boundary[key])
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize(("make", "kwargs"), PROBLEMS)
def test_layout_single_and_frames(make, kwargs):
    problem = make()
    frames = problem.generate(2, cache=False, coords=True, **kwargs)
    n_space = len(problem.space_axes)
    assert frames.y.ndim == 3 + n_space and frames.y.shape[1] == 1
    assert frames.x.shape[1] == 1 + n_space + 1  # data, one coordinate per axis, time
    assert frames.x.shape[2:] == frames.y.shape[2:] and frames.y.shape[-1] == 25
    assert frames.axes == (*problem.space_axes, "t")
    for i, axis in enumerate(frames.axes):
        coord = frames.coords[axis]
        channel = frames.x[:, 1 + i]
        index = [0] * (frames.y.ndim - 2)
        index[i] = slice(None)
        torch.testing.assert_close(channel[(slice(None), *index)], coord.expand(2, -1))
    assert float(frames.coords["t"][-1]) == pytest.approx(problem.t_final)
    for value in frames.boundary.values():
        assert value.shape[:2] == (2, 1) and value.shape[-1] == 25
    single = problem.generate(2, task="single", cache=False, **kwargs)
    assert single.y.shape == frames.y.shape[:-1] and single.x.shape == single.y.shape
    torch.testing.assert_close(single.y, frames.y[..., -1])
    assert single.meta["layout"].startswith("(n, C")


def test_cache_roundtrip_new_file_per_parameter_and_env(tmp_path, monkeypatch):
    heat = Heat()
    first = heat.generate(4, resolution=17, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("heat-*.pt"))
    assert len(files) == 1
    again = heat.generate(4, resolution=17, cache_dir=tmp_path)  # read from the file
    assert torch.equal(first.y, again.y) and again.meta["spec"] == first.meta["spec"]
    # every parameter that changes the data changes the file
    heat.generate(4, resolution=17, seed=1, cache_dir=tmp_path)
    heat.generate(5, resolution=17, cache_dir=tmp_path)
    heat.generate(4, resolution=19, cache_dir=tmp_path)
    heat.generate(4, resolution=17, dtype=torch.float64, cache_dir=tmp_path)
    Heat(k=0.02).generate(4, resolution=17, cache_dir=tmp_path)
    heat.generate(4, resolution=17, times=torch.tensor([0.1, 0.2]), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("heat-*.pt"))) == 7
    # coordinate channels are assembled after loading: same file
    with_coords = heat.generate(4, resolution=17, coords=True, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("heat-*.pt"))) == 7 and with_coords.x.shape[1] == 3
    # the environment variable picks the directory; ~ is expanded at call time
    env_dir = tmp_path / "env"
    monkeypatch.setenv("CONSTRAINT_LAYERS_CACHE", str(env_dir))
    heat.generate(2, resolution=17)
    assert len(list(env_dir.glob("heat-*.pt"))) == 1
    monkeypatch.delenv("CONSTRAINT_LAYERS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "constraint-layers"
    assert resolve_cache_dir() == expected
    assert resolve_cache_dir("~/x") == tmp_path / "home" / "x"


def _only_file(directory: Path) -> Path:
    (path,) = list(directory.glob("*.pt"))
    return path


def test_a_file_made_for_other_parameters_is_refused(tmp_path):
    heat = Heat()
    heat.generate(3, resolution=17, cache_dir=tmp_path)
    path = _only_file(tmp_path)
    # put the file of seed 0 where the file of seed 1 is expected
    spec1 = heat.spec(3, 17, heat.default_times("frames"), 1, torch.get_default_dtype())
    path.rename(cache_mod.cache_path(tmp_path, "heat", spec1))
    with pytest.raises(CacheError, match="other parameters"):
        heat.generate(3, resolution=17, seed=1, cache_dir=tmp_path)
    # refresh regenerates and overwrites
    fresh = heat.generate(3, resolution=17, seed=1, cache_dir=tmp_path, cache="refresh")
    again = heat.generate(3, resolution=17, seed=1, cache_dir=tmp_path)
    assert torch.equal(fresh.y, again.y)
    assert not torch.equal(fresh.y, heat.generate(3, resolution=17, cache=False).y)


def test_tampered_or_corrupt_files_are_refused(tmp_path):
    heat = Heat()
    heat.generate(3, resolution=17, cache_dir=tmp_path)
    path = _only_file(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["u"][0, 0, 0] += 1.0
    torch.save(payload, path)
    with pytest.raises(CacheError, match="checksum"):
        heat.generate(3, resolution=17, cache_dir=tmp_path)
    payload = torch.load(path, weights_only=True)
    spec = json.loads(payload["spec"])
    spec["seed"] = 99
    payload["spec"] = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    torch.save(payload, path)
    with pytest.raises(CacheError, match="other parameters"):
        heat.generate(3, resolution=17, cache_dir=tmp_path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(CacheError, match="cannot read"):
        heat.generate(3, resolution=17, cache_dir=tmp_path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(CacheError, match="is not a"):
        heat.generate(3, resolution=17, cache_dir=tmp_path)
    ok = heat.generate(3, resolution=17, cache_dir=tmp_path, cache="refresh")
    assert torch.equal(ok.y, heat.generate(3, resolution=17, cache_dir=tmp_path).y)


def test_cache_off_writes_nothing(tmp_path):
    Heat().generate(2, resolution=17, cache=False, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="cache must be"):
        Heat().generate(2, resolution=17, cache="yes", cache_dir=tmp_path)


def test_operator_data_split_subset_and_dataset():
    data = Stokes().generate(10, resolution=17, cache=False)
    train, test = data.split(8)
    assert len(train) == 8 and len(test) == 2
    assert torch.equal(test.y, data.y[8:]) and torch.equal(
        test.params["omega"], data.params["omega"][8:]
    )
    assert torch.equal(test.boundary["x_low"], data.boundary["x_low"][8:])
    ds = train.dataset()
    assert isinstance(ds, OperatorDataset) and len(ds) == 8
    item = ds[3]
    assert set(item) == {"x", "y"} and torch.equal(item["y"], data.y[3])
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["x"].shape == (4, 1, 17, 25)
    extra = train.dataset(keys=("x", "y", "omega"))
    assert extra[0]["omega"].shape == ()
    with pytest.raises(ValueError, match="unknown keys"):
        train.dataset(keys=("x", "nope"))
    with pytest.raises(ValueError, match="between 1 and 9"):
        data.split(10)
    coords = data.with_coordinates()
    assert coords.x.shape[1] == 3 and coords.with_coordinates() is coords


def test_add_coordinates_checks_shapes():
    with pytest.raises(ValueError, match="one 1-D coordinate tensor per grid axis"):
        add_coordinates(torch.zeros(1, 1, 4, 5), {"x": torch.zeros(4)})
    with pytest.raises(TypeError):
        add_coordinates([1, 2], {})


def test_neuraloperator_trainer_format():
    """The dataset feeds a neuraloperator FNO channel-first, coordinates included."""
    neuralop = pytest.importorskip("neuralop")
    data = Heat().generate(4, resolution=33, coords=True, cache=False)
    model = neuralop.models.FNO(
        n_modes=(8, 8),
        in_channels=data.x.shape[1],
        out_channels=1,
        hidden_channels=8,
        positional_embedding=None,
    )
    batch = next(iter(torch.utils.data.DataLoader(data.dataset(), batch_size=2)))
    out = model(batch["x"])
    assert out.shape == batch["y"].shape


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: Heat().generate(0, cache=False), ValueError, "n must be >= 1"),
        (lambda: Heat().generate(2, size="huge", cache=False), ValueError, "size must be one of"),
        (lambda: Heat().generate(2, task="movie", cache=False), ValueError, "task must be one of"),
        (lambda: Heat().generate(2, resolution=3, cache=False), ValueError, "resolution must be"),
        (lambda: Heat().generate(2, seed=-1, cache=False), TypeError, "seed"),
        (lambda: Heat().generate(2, seed=1.0, cache=False), TypeError, "seed"),
        (lambda: Heat().generate(2, dtype=torch.int64, cache=False), ValueError, "floating"),
        (lambda: Heat().generate(2, dtype="float32", cache=False), TypeError, "torch.dtype"),
        (lambda: Heat().generate(2, times=[0.0, 0.1], cache=False), ValueError, "> 0"),
        (lambda: Heat().generate(2, times=[], cache=False), ValueError, "at least one"),
        (lambda: Heat().generate(2, coords=1, cache=False), TypeError, "bools"),
        (lambda: Heat().generate(2, cache_dir=3), TypeError, "cache_dir"),
        (lambda: Heat().generate(2, resolution=2.5, cache=False), TypeError, "int"),
    ],
)
def test_generate_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_paper_size_presets():
    assert Heat().sizes("frames")["paper"] == {"n": 1200, "resolution": 1024}
    assert Heat().sizes("single")["paper"] == {"n": 600, "resolution": 500}
    assert Stokes().sizes("frames")["paper"] == {"n": 1200, "resolution": 500}
    assert Burgers().sizes("frames")["paper"] == {"n": 1200, "resolution": 128}
    assert Burgers().sizes("single")["paper"] == {"n": 600, "resolution": 128}
    assert Cavity().sizes("frames")["paper"] == {"n": 1200, "resolution": 50}
    data = Heat().generate(task="single", cache=False)  # small preset
    assert data.y.shape == (100, 1, 128) and data.meta["size"] == "small"
    assert isinstance(data, OperatorData)


def test_threads_option_changes_nothing_but_speed():
    before = torch.get_num_threads()
    a = Burgers().generate(3, resolution=17, threads=2, cache=False, dtype=torch.float64)
    assert torch.get_num_threads() == before
    b = Burgers().generate(3, resolution=17, cache=False, dtype=torch.float64)
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Heat().generate(2, threads=0, cache=False)
