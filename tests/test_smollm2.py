"""The packaged SmolLM2 on the paper's IOI example: the route finds the name mover edge from ' Mary'."""

from __future__ import annotations

import pytest

import flowray
from conftest import IOI_PROMPT
from flowray.routes import EdgeKind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ioi(smollm2):
    ids = smollm2.tokenizer(IOI_PROMPT, return_tensors="pt").input_ids
    return flowray.edge_importances(smollm2, ids)


def test_model_predicts_mary(ioi, smollm2):
    assert smollm2.tokenizer.decode([int(ioi.predicted_ids[-1])]) == " Mary"
    assert ioi.tokens[1] == " Mary"


def test_route_has_an_upper_layer_attention_edge_from_mary(ioi):
    route = flowray.extract_route(ioi, tau=0.04)
    mary = ioi.tokens.index(" Mary")
    upper = [e for e in route.edges if e.kind is EdgeKind.ATTENTION and e.source.position == mary
             and e.target.position == ioi.n_tokens - 1 and e.target.layer >= ioi.n_layers // 2]
    assert upper, "no upper-layer attention edge from ' Mary' to the last position"
    heads = {(e.target.layer, h.head) for e in upper for h in e.heads}
    assert heads & {(23, 0), (23, 1), (23, 7)}  # the name movers named in the environment notes


def test_all_positions_at_once_agree_with_single_routes(ioi):
    masks = flowray.route_masks(ioi, 0.04)
    for pos in (0, 5, ioi.n_tokens - 1):
        route = flowray.extract_route(ioi, tau=0.04, position=pos)
        got = {(int(l), int(h)) for l, h in zip(*masks.heads[pos].nonzero())}
        assert got == route.heads()
