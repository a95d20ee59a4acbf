"""compare's routes: the corpus job's batched, padded statistics give exactly the one-prompt routes' heads."""

from __future__ import annotations

import torch

from flowray.models.families import adapter_for
from tiny_models import VOCAB, tiny_model


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_batched_routes_equal_one_prompt_routes():
    """compare's routes (the corpus job's padded statistics, last position) = extract_route per prompt."""
    from flowray.baselines.agreement import same_heads
    from flowray.baselines.batched import SplitClock, last_routes
    from flowray.baselines.measure import route_of
    from flowray.models.loading import LoadedModel

    model = tiny_model("llama-gqa", seed=4)
    lm = LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), name="tiny")
    prompts = [_ids(1, T, seed=T)[0] for T in (9, 5, 12, 7)]  # padded to 12 in one batch
    clock = SplitClock()
    for tau in (0.02, 0.08):
        got = last_routes(lm, prompts, tau, clock)
        single = [route_of(lm, ids, tau) for ids in prompts]
        assert [r.n_tokens for r in got] == [9, 5, 12, 7]
        assert same_heads(single, got, lm.adapter.shape.n_heads)
        assert [len(r.heads) for r in got] != [0] * 4
    assert all(v > 0 for v in clock.wall.values())
