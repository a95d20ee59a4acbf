"""Attribution patching (EAP) against exact per-head activation patching.

Exact where the logit difference is affine in the patched head outputs: the last layer's heads, once the
last block's MLP is zeroed and the final norm is the identity (then LD = const + a . w for a fixed w), so
a wrong sign, a missing position, a swapped clean/corrupt difference or a gradient from the wrong row fails
the test. Elsewhere EAP is a first-order Taylor estimate: patching with ``a + eps * (a' - a)`` changes LD by
``eps * EAP + O(eps^2)``, checked on every head of every layer (a gradient that missed the paths through
later heads would leave an O(eps) error).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowray.baselines.eap import eap_sweep
from flowray.baselines.forward import logit_diff
from flowray.baselines.interventions import head_outputs, patching_sweep, replace_heads
from flowray.models.families import adapter_for
from tiny_models import VOCAB, tiny_model


def _twins(P: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (P, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1 : T - 1 : 2] = torch.randint(0, VOCAB, corrupt[:, 1 : T - 1 : 2].shape, generator=g)
    answer, wrong = torch.randint(0, VOCAB, (P,), generator=g), torch.randint(0, VOCAB, (P,), generator=g)
    return clean, corrupt, answer, wrong


def _linear_in_last_layer(case: str) -> torch.nn.Module:
    """A tiny float64 model whose logits are affine in the last layer's head outputs."""
    model = tiny_model(case, seed=3).double()
    with torch.no_grad():
        if case == "gpt2":
            model.transformer.ln_f = torch.nn.Identity()
            mlp_out = model.transformer.h[-1].mlp.c_proj
        else:
            model.model.norm = torch.nn.Identity()
            mlp_out = model.model.layers[-1].mlp.down_proj
        mlp_out.weight.zero_()
        if mlp_out.bias is not None:
            mlp_out.bias.zero_()
    return model


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_eap_equals_exact_patching_where_the_model_is_linear(case):
    model = _linear_in_last_layer(case)
    adapter = adapter_for(model)
    clean, corrupt, answer, wrong = _twins(3, 7, seed=4)
    eap = eap_sweep(model, adapter, clean, corrupt, answer, wrong)
    exact = patching_sweep(model, adapter, clean, corrupt, answer, wrong, batch_size=64)
    last = adapter.shape.n_layers - 1
    np.testing.assert_allclose(eap.ld_clean, exact.ld_clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eap.ld_corrupt, exact.ld_corrupt, rtol=1e-5, atol=1e-5)
    # patching_sweep reports float32 logits: agreement to float32 precision of logits of size ~10
    np.testing.assert_allclose(eap.ld_patched[:, last], exact.ld_patched[:, last], rtol=0, atol=2e-5)
    assert np.abs(exact.drop[:, last]).max() > 0.05  # the heads matter: the check is not 0 == 0
    # below the last layer the model is not linear in the heads: the estimate differs
    assert np.abs(eap.ld_patched[:, :last] - exact.ld_patched[:, :last]).max() > 1e-3


@torch.no_grad()
def _ld_patched_towards(model, adapter, clean, answer, wrong, acts, corrupt_acts, l, h, eps):
    """Exact LD of every row with head (l, h) set to ``a + eps * (a' - a)`` (float64)."""
    P = clean.shape[0]
    source = acts + eps * (corrupt_acts - acts)  # [L, P, T, H, dh]
    rows = torch.arange(P)
    with replace_heads(model, adapter, rows, [l] * P, [h] * P, source=source, source_rows=rows):
        logits = model(input_ids=clean, use_cache=False).logits[:, -1]
    return logit_diff(logits, answer, wrong)


def test_eap_is_the_first_order_term_of_patching_everywhere():
    """|LD(a + eps da) - LD(a) - eps EAP| <= C eps^2 for every head: halving eps quarters the error.

    GPT-2 runs in float64 throughout (Llama's RMSNorm and rotary tables, OPT and NeoX round through float32,
    whose noise would swamp an eps^2 term)."""
    model = tiny_model("gpt2", seed=5).double()
    adapter = adapter_for(model)
    clean, corrupt, answer, wrong = _twins(2, 6, seed=6)
    eap = eap_sweep(model, adapter, clean, corrupt, answer, wrong)
    first_order = torch.as_tensor(eap.ld_patched - eap.ld_clean[:, None, None])  # [P, L, H]
    acts, _ = head_outputs(model, adapter, clean)
    corrupt_acts, _ = head_outputs(model, adapter, corrupt)
    ld0 = torch.as_tensor(eap.ld_clean)
    s = adapter.shape
    errors = {}
    for eps in (2e-3, 1e-3):
        err = torch.zeros(clean.shape[0], s.n_layers, s.n_heads, dtype=torch.float64)
        for l in range(s.n_layers):
            for h in range(s.n_heads):
                ld = _ld_patched_towards(model, adapter, clean, answer, wrong, acts, corrupt_acts, l, h, eps)
                err[:, l, h] = ld - ld0 - eps * first_order[:, l, h]
        errors[eps] = err
    assert first_order.abs().max() > 0.1  # heads with a real first-order effect
    # the error is second order: below 1% of the first-order term's scale at eps = 1e-3 ...
    assert errors[1e-3].abs().max() <= 1e-2 * 1e-3 * first_order.abs().max()
    # ... and it shrinks as eps^2 (ratio 4) where it is above float64 noise, not as eps (ratio 2)
    big = errors[2e-3].abs() > 1e-10
    ratio = errors[2e-3][big] / errors[1e-3][big]
    assert big.sum() > 0 and float(ratio.min()) > 3.5 and float(ratio.max()) < 4.5


def test_eap_refuses_twins_of_different_lengths():
    from flowray.errors import InputError

    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    with pytest.raises(InputError, match="same shape"):
        eap_sweep(model, adapter, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long), [1], [2])
