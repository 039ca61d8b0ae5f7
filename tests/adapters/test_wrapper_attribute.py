"""Attributes a wrapper offers through its adapter (``Adapter.wrapper_attribute``)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import constraint_layers as cl


class _Saving(torch.nn.Conv1d):
    """A model type whose library calls ``model.save_state(...)``."""


class SavingAdapter(cl.adapters.Adapter):
    name = "saving-test"

    def wrapper_attribute(self, wrapper, name):
        if name == "save_state":
            return lambda: {"saved": type(wrapper).__name__}
        return super().wrapper_attribute(wrapper, name)


@pytest.fixture
def saving_adapter():
    cl.adapters.register(_Saving)(SavingAdapter)
    yield SavingAdapter
    cl.adapters.unregister(SavingAdapter)


def test_the_adapter_supplies_what_the_wrapper_lacks(saving_adapter):
    wrapped = cl.wrap(_Saving(1, 1, 3, padding=1), cl.Dirichlet(0.0))
    assert wrapped.save_state() == {"saved": "BoundaryCorrection"}
    # the wrapper's own attributes, parameters and submodules come first
    assert wrapped.model.weight is wrapped.model.weight and isinstance(wrapped.model, _Saving)
    with pytest.raises(AttributeError, match="no attribute 'load_state'"):
        wrapped.load_state  # noqa: B018


def test_plain_modules_offer_nothing_and_name_the_model_attribute():
    net = torch.nn.Conv1d(1, 1, 3, padding=1)
    wrapped = cl.wrap(net, cl.Dirichlet(0.0))
    assert not hasattr(wrapped, "save_checkpoint")
    with pytest.raises(AttributeError, match=r"use wrapped\.model\.kernel_size"):
        wrapped.kernel_size  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing'$"):
        wrapped.nothing  # noqa: B018


def test_copies_and_pickles_still_work(saving_adapter):
    x = torch.randn(2, 1, 8)
    for model in (_Saving(1, 1, 3, padding=1), torch.nn.Conv1d(1, 1, 3, padding=1)):
        wrapped = cl.wrap(model, cl.Dirichlet(0.5))
        for twin in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
            assert torch.equal(twin(x), wrapped(x))
            assert twin.model is not model
