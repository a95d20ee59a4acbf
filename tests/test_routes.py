"""Routes: hand-computed graphs, invariants, vectorised masks == graph walk, JSON schema, networkx."""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema
import numpy as np
import pytest
import torch

import flowray
from flowray.errors import InputError
from flowray.routes import (
    ROUTE_JSON_SCHEMA,
    EdgeKind,
    Node,
    NodeKind,
    Route,
    extract_route,
    route_masks,
)
from tiny_models import VOCAB, tiny_model


@dataclass
class FakeImportances:
    attn: np.ndarray
    attn_residual: np.ndarray
    ffn: np.ndarray
    ffn_residual: np.ndarray | None


def _hand_made():
    """L=1 sequential block, H=2 heads, T=3 tokens; only the last position's numbers matter."""
    attn = np.zeros((1, 2, 3, 3))
    attn[0, :, 2, :] = [[0.30, 0.02, 0.05],   # head 0: source 0 strong, 1 dropped, 2 kept
                        [0.10, 0.01, 0.02]]   # head 1: source 0 kept, others dropped
    attn_residual = np.array([[1.0, 1.0, 0.50]])  # sums: 0.3+.02+.05+.1+.01+.02+.5 = 1.0
    ffn = np.array([[0.5, 0.5, 0.60]])
    ffn_residual = np.array([[0.5, 0.5, 0.40]])
    return FakeImportances(attn, attn_residual, ffn, ffn_residual)


def test_hand_computed_route():
    route = extract_route(_hand_made(), tau=0.04, position=-1, tokens=["a", "b", "c"])
    by_kind = {(e.kind, e.source.position, e.target.kind): e for e in route.edges}
    # FFN node: both parts survive, no renormalisation needed (0.6 + 0.4 = 1)
    assert by_kind[(EdgeKind.FFN, 2, NodeKind.BLOCK)].importance == pytest.approx(0.6)
    # attention node: survivors 0.30, 0.05, 0.10 and residual 0.50 -> total 0.95
    total = 0.30 + 0.05 + 0.10 + 0.50
    e0 = by_kind[(EdgeKind.ATTENTION, 0, NodeKind.ATTN)]
    assert e0.importance == pytest.approx(0.40 / total)
    assert [(h.head, round(h.importance, 6)) for h in e0.heads] == [(0, round(0.30 / total, 6)), (1, round(0.10 / total, 6))]
    e2 = by_kind[(EdgeKind.ATTENTION, 2, NodeKind.ATTN)]
    assert [h.head for h in e2.heads] == [0] and e2.importance == pytest.approx(0.05 / total)
    assert by_kind[(EdgeKind.RESIDUAL, 2, NodeKind.ATTN)].importance == pytest.approx(0.50 / total)
    assert (EdgeKind.ATTENTION, 1, NodeKind.ATTN) not in by_kind  # both sub-edges of source 1 dropped
    assert route.positions() == {0, 2}
    assert route.heads() == {(0, 0), (0, 1)}
    assert route.top == Node(0, 2, NodeKind.BLOCK)


def test_route_stops_where_no_part_survives():
    imp = _hand_made()
    imp.ffn[0, 2], imp.ffn_residual[0, 2] = 0.01, 0.02  # neither path into the attention node survives
    route = extract_route(imp, tau=0.04)
    assert route.edges == () and route.nodes == (Node(0, 2, NodeKind.BLOCK),)


TINY_TAU = 1e-9  # tau must lie strictly between 0 and 1 (flowray.checks.check_tau): nearly the whole graph


@pytest.fixture(scope="module", params=["llama-gqa", "neox-parallel", "opt"])
def tiny_imp(request):
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    return flowray.edge_importances(tiny_model(request.param, seed=2), ids)


def test_tiny_tau_reaches_every_position(tiny_imp):
    route = extract_route(tiny_imp, tau=TINY_TAU)
    assert route.positions() == set(range(tiny_imp.n_tokens))


def _edge_keys(route):
    return {(e.source, e.target, e.kind) for e in route.edges}


def test_larger_tau_gives_a_subgraph(tiny_imp):
    routes = [extract_route(tiny_imp, tau=t) for t in (TINY_TAU, 0.01, 0.04, 0.1, 0.3)]
    for small, large in zip(routes, routes[1:]):
        assert set(large.nodes) <= set(small.nodes)
        assert _edge_keys(large) <= _edge_keys(small)
        assert large.heads() <= small.heads()
    assert len(routes[-1].edges) < len(routes[0].edges)


@pytest.mark.parametrize("tau", [TINY_TAU, 0.02, 0.08])
def test_vectorised_masks_equal_the_graph_walk(tiny_imp, tau):
    masks = route_masks(tiny_imp, tau)
    L = tiny_imp.n_layers
    for pos in range(tiny_imp.n_tokens):
        route = extract_route(tiny_imp, tau=tau, position=pos)
        heads = {(int(l), int(h)) for l, h in zip(*np.nonzero(masks.heads[pos]))}
        assert heads == route.heads()
        ffn = {e.target.layer for e in route.edges if e.kind is EdgeKind.FFN}
        assert ffn == set(np.flatnonzero(masks.ffn[pos]).tolist())
        assert set(np.flatnonzero(masks.reached[pos, 0]).tolist()) == route.positions()
        for l in range(1, L):  # positions reached at each block's output
            got = {n.position for n in route.nodes if n.kind is NodeKind.BLOCK and n.layer == l - 1}
            assert got == set(np.flatnonzero(masks.reached[pos, l]).tolist())


def test_json_round_trip_schema_and_networkx(tiny_imp, tmp_path):
    route = extract_route(tiny_imp, tau=0.02, position=-2)
    data = json.loads(route.to_json())
    jsonschema.Draft7Validator(ROUTE_JSON_SCHEMA).validate(data)
    back = Route.load(route.save(tmp_path / "r.json"))
    assert back == route
    # from Python, as from the CLI, the route names the prediction it explains
    assert data["prediction"] == {"token_id": int(tiny_imp.predicted_ids[-2]), "token": None}


def test_the_prediction_is_decoded_with_a_tokenizer(tiny_imp):
    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    route = extract_route(tiny_imp, tau=0.02, position=3, tokenizer=Tok())
    want = int(tiny_imp.predicted_ids[3])
    assert route.prediction == {"token_id": want, "token": f"<{want}>"}
    g = route.to_networkx()
    assert g.number_of_nodes() == len(route.nodes) and g.number_of_edges() == len(_edge_keys(route))
    top = route.top
    assert g.in_degree(top) > 0 and g.out_degree(top) == 0


def test_bad_tau_and_position(tiny_imp):
    with pytest.raises(InputError, match="tau must be"):
        extract_route(tiny_imp, tau=1.2)
    with pytest.raises(InputError, match="tau must be"):
        route_masks(tiny_imp, tau=-0.1)
    with pytest.raises(InputError, match="out of range for 12 tokens"):
        extract_route(tiny_imp, position=12)
    with pytest.raises(InputError, match="integer"):
        extract_route(tiny_imp, position=1.5)
    with pytest.raises(InputError, match="not a flowray route"):
        Route.from_dict({"schema": "other"})


@pytest.mark.parametrize("tau", [0, 0.0, 1, 1.0, -0.1, True])
def test_one_tau_rule_for_library_config_and_cli(tau):
    """The library, the job config and the CLI accept exactly the same thresholds (flowray.checks)."""
    import argparse

    from flowray.cli_types import tau_arg
    from flowray.config import JobConfig
    from flowray.errors import ConfigError
    from flowray.routes import check_tau

    with pytest.raises(InputError, match="strictly between 0 and 1"):
        check_tau(tau)
    with pytest.raises(ConfigError, match="strictly between 0 and 1|expected an integer or a number"):
        JobConfig.from_dict({"corpora": [{"domain": "p", "source": {"kind": "pydoc_topics"}}], "tau": [tau]})
    if not isinstance(tau, bool):
        with pytest.raises(argparse.ArgumentTypeError, match="strictly between 0 and 1"):
            tau_arg(str(tau))
    assert check_tau(0.04) == tau_arg("0.04") == 0.04
