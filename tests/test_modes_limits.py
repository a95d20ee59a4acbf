"""The capture runs in eval mode whatever mode the caller left the model in; dense outputs are sized first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowray
from flowray import limits
from flowray.errors import InputError
from flowray.models.modes import eval_mode
from tiny_models import VOCAB, tiny_model


def _ids(T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(T))


@pytest.mark.parametrize("case", ["gpt2", "opt", "llama-gqa"])
def test_a_model_in_train_mode_gives_its_eval_mode_importances_and_keeps_its_mode(case):
    model = tiny_model(case, seed=1, attn="sdpa")
    for m in model.modules():  # dropout everywhere, so train mode would change the forward pass
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.config.attention_dropout = model.config.attn_pdrop = model.config.dropout = 0.5
    ids = _ids(9)
    want = flowray.edge_importances(model.eval(), ids)
    model.train()
    head = list(model.modules())[-1]
    head.eval()  # a caller's own mixture of modes is restored exactly
    torch.manual_seed(0)
    got = flowray.edge_importances(model, ids)
    np.testing.assert_array_equal(got.attn, want.attn)
    np.testing.assert_array_equal(got.predicted_ids, want.predicted_ids)
    assert model.training and not head.training
    assert sum(m.training for m in model.modules()) == sum(1 for _ in model.modules()) - 1


def test_eval_mode_restores_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[1].training
        raise RuntimeError("boom")
    assert model.training and model[1].training


def test_the_dense_output_is_estimated_before_it_is_allocated(monkeypatch):
    # the probe's case: SmolLM2's 30 layers x 9 heads at 8,192 tokens
    assert limits.dense_output_bytes(30, 9, [8192]) == pytest.approx(72.5e9, rel=1e-3)
    model = tiny_model("gpt2", seed=1)
    L, H = model.config.n_layer, model.config.n_head
    monkeypatch.setattr(limits, "MAX_DENSE_OUTPUT_BYTES", limits.dense_output_bytes(L, H, [10]))
    flowray.edge_importances(model, _ids(10))  # exactly at the budget: fine
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a) or real_zeros(*a, **k))
    with pytest.raises(InputError, match=r"would take about 4,752 bytes \(3 layers x 3 heads x 11 x 11 float32\), "
                       r"more than the budget .*MAX_DENSE_OUTPUT_BYTES.*shorter text.*flowray.prediction_stats"):
        flowray.edge_importances(model, _ids(11))
    assert not [a for a in allocated if len(a) == 4], "no [L, H, T, T] buffer before the check"
    monkeypatch.setenv("FLOWRAY_MAX_DENSE_BYTES", "1e12")
    flowray.edge_importances(model, _ids(11))  # the environment overrides the constant


def test_the_default_budget_is_a_fraction_of_the_ram():
    budget, where = limits.dense_output_budget()
    assert budget == int(limits.physical_memory_bytes() * limits.DENSE_RAM_FRACTION) and "RAM" in where
