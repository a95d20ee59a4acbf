"""Information flow routes (paper figure 3 + appendix B.2) as typed graphs, for one position or all at once.

From the top node of a position, walk down layer by layer. At every node, the parts whose importance is
at most ``tau`` are dropped and the survivors renormalised (B.2); attention sub-edges are then summed per
source token into one attention edge that remembers its heads. A surviving part is an edge of the route
and its lower node joins the route.

Node kinds (all layers 0-based, like ``EdgeImportances``' first axis):
``embed`` (layer 0): the token embedding, input of block 0;
``attn`` (layer l): ``x^{lA}``, the residual stream after block l's attention (sequential blocks only);
``block`` (layer l): ``x^l``, the residual stream leaving block l. The top node is ``(L-1, pos, block)``.

This module sees numpy arrays only (no torch, transformers or ray).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from flowray.checks import check_tau
from flowray.errors import InputError

SCHEMA_ID = "flowray.route/1"


class NodeKind(str, Enum):
    EMBED = "embed"
    ATTN = "attn"
    BLOCK = "block"


class EdgeKind(str, Enum):
    ATTENTION = "attention"  # x^{l-1}_j -> x^{lA}_pos (or x^l_pos for parallel blocks), through heads
    RESIDUAL = "residual"  # the same position one node up
    FFN = "ffn"  # x^{lA}_pos -> x^l_pos (parallel: x^{l-1}_pos -> x^l_pos) through the FFN


@dataclass(frozen=True, order=True)
class Node:
    layer: int
    position: int
    kind: NodeKind


@dataclass(frozen=True)
class HeadImportance:
    head: int
    importance: float  # the head's sub-edge importance, renormalised among the node's survivors


@dataclass(frozen=True)
class Edge:
    source: Node
    target: Node
    kind: EdgeKind
    importance: float  # renormalised among the target node's surviving parts (appendix B.2)
    heads: tuple[HeadImportance, ...] = ()  # attention edges only, strongest first


class Importances(Protocol):
    """What routes need (``flowray.EdgeImportances`` has it)."""

    attn: np.ndarray  # [L, H, T, T]
    attn_residual: np.ndarray  # [L, T]
    ffn: np.ndarray  # [L, T]
    ffn_residual: np.ndarray | None  # [L, T] or None (parallel blocks)


@dataclass(frozen=True)
class Route:
    """The important subgraph for the prediction at ``position``."""

    position: int
    tau: float
    n_layers: int
    n_heads: int
    parallel: bool
    tokens: tuple[str, ...]
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    model: str = ""
    token_ids: tuple[int, ...] = ()
    prediction: dict = field(default_factory=dict)  # {"token_id": int, "token": str | None}

    @property
    def top(self) -> Node:
        return Node(self.n_layers - 1, self.position, NodeKind.BLOCK)

    def heads(self) -> set[tuple[int, int]]:
        """``(layer, head)`` of every head with a sub-edge in the route."""
        return {(e.target.layer, h.head) for e in self.edges if e.kind is EdgeKind.ATTENTION for h in e.heads}

    def positions(self) -> set[int]:
        """Token positions the route reaches at the embedding level."""
        return {n.position for n in self.nodes if n.kind is NodeKind.EMBED}

    # --- export -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        ids = {node: i for i, node in enumerate(self.nodes)}
        return {
            "schema": SCHEMA_ID,
            "model": self.model,
            "tau": self.tau,
            "position": self.position,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel": self.parallel,
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "prediction": dict(self.prediction),
            "nodes": [
                {"id": i, "layer": n.layer, "position": n.position, "kind": n.kind.value}
                for n, i in ids.items()
            ],
            "edges": [
                {
                    "source": ids[e.source],
                    "target": ids[e.target],
                    "kind": e.kind.value,
                    "importance": e.importance,
                    **({"heads": [{"head": h.head, "importance": h.importance} for h in e.heads]}
                       if e.kind is EdgeKind.ATTENTION else {}),
                }
                for e in self.edges
            ],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> Route:
        if data.get("schema") != SCHEMA_ID:
            raise InputError(f"not a flowray route: schema is {data.get('schema')!r}, expected {SCHEMA_ID!r}")
        nodes = [Node(n["layer"], n["position"], NodeKind(n["kind"])) for n in data["nodes"]]
        edges = [
            Edge(
                source=nodes[e["source"]],
                target=nodes[e["target"]],
                kind=EdgeKind(e["kind"]),
                importance=float(e["importance"]),
                heads=tuple(HeadImportance(h["head"], float(h["importance"])) for h in e.get("heads", ())),
            )
            for e in data["edges"]
        ]
        return cls(
            position=data["position"],
            tau=data["tau"],
            n_layers=data["n_layers"],
            n_heads=data["n_heads"],
            parallel=data["parallel"],
            tokens=tuple(data["tokens"]),
            nodes=tuple(nodes),
            edges=tuple(edges),
            model=data.get("model", ""),
            token_ids=tuple(data.get("token_ids", ())),
            prediction=dict(data.get("prediction", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> Route:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_networkx(self):
        """A ``networkx.MultiDiGraph`` (lower node -> upper node, edge key = kind: a node pair can be joined
        by both a residual and an attention/FFN edge); node and edge attributes mirror the JSON."""
        from flowray.errors import require

        nx = require("networkx", feature="Route.to_networkx")
        g = nx.MultiDiGraph(tau=self.tau, position=self.position, model=self.model)
        for n in self.nodes:
            g.add_node(n, layer=n.layer, position=n.position, kind=n.kind.value, token=self.tokens[n.position])
        for e in self.edges:
            g.add_edge(e.source, e.target, key=e.kind.value, kind=e.kind.value, importance=e.importance,
                       heads={h.head: h.importance for h in e.heads})
        return g


# JSON Schema (draft-07) of Route.to_dict(); tests validate exported routes against it.
ROUTE_JSON_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "flowray route",
    "type": "object",
    "required": ["schema", "tau", "position", "n_layers", "n_heads", "parallel", "tokens", "nodes", "edges"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "model": {"type": "string"},
        "tau": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},  # flowray.checks.check_tau
        "position": {"type": "integer", "minimum": 0},
        "n_layers": {"type": "integer", "minimum": 1},
        "n_heads": {"type": "integer", "minimum": 1},
        "parallel": {"type": "boolean"},
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_ids": {"type": "array", "items": {"type": "integer"}},
        "prediction": {"type": "object", "properties": {"token_id": {"type": "integer", "minimum": 0},
                                                        "token": {"type": ["string", "null"]}}},
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "layer", "position", "kind"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "integer", "minimum": 0},
                    "layer": {"type": "integer", "minimum": 0},
                    "position": {"type": "integer", "minimum": 0},
                    "kind": {"enum": [k.value for k in NodeKind]},
                },
            },
        },
        "edges": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "kind", "importance"],
                "additionalProperties": False,
                "properties": {
                    "source": {"type": "integer", "minimum": 0},
                    "target": {"type": "integer", "minimum": 0},
                    "kind": {"enum": [k.value for k in EdgeKind]},
                    "importance": {"type": "number", "minimum": 0, "maximum": 1.000001},
                    "heads": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["head", "importance"],
                            "additionalProperties": False,
                            "properties": {
                                "head": {"type": "integer", "minimum": 0},
                                "importance": {"type": "number", "minimum": 0, "maximum": 1.000001},
                            },
                        },
                    },
                },
            },
        },
    },
}


# --- construction -----------------------------------------------------------------------------------
def check_position(position: int, n_tokens: int) -> int:
    """Accept ``-n_tokens <= position < n_tokens``; return the non-negative index."""
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise InputError(f"position must be an integer; got {position!r}")
    if not -n_tokens <= position < n_tokens:
        raise InputError(
            f"position {position} is out of range for {n_tokens} tokens; use 0..{n_tokens - 1} "
            f"or -{n_tokens}..-1 (-1 is the last token)"
        )
    return int(position) % n_tokens


def _input_node(layer: int, position: int) -> Node:
    return Node(0, position, NodeKind.EMBED) if layer == 0 else Node(layer - 1, position, NodeKind.BLOCK)


def _attention_parts(imp: Importances, l: int, pos: int, tau: float, extra: dict[EdgeKind, float]):
    """Surviving parts of a node fed by attention: sub-edges [H, pos+1] plus direct parts (kind -> value).

    Returns (kept sub-edge matrix with zeros for dropped ones, kept direct parts, normaliser).
    """
    sub = imp.attn[l, :, pos, : pos + 1]  # [H, pos+1]
    sub_kept = np.where(sub > tau, sub, 0.0)
    kept = {kind: v for kind, v in extra.items() if v > tau}
    total = float(sub_kept.sum()) + sum(kept.values())
    return sub_kept, kept, total


def extract_route(
    imp: Importances,
    tau: float = 0.04,
    position: int = -1,
    *,
    tokens: tuple[str, ...] | list[str] | None = None,
    model: str = "",
    tokenizer=None,
) -> Route:
    """The information flow route of the prediction at ``position`` (negative counts from the end).

    ``prediction`` holds the model's top next token there: ``token_id`` always (from ``imp.predicted_ids``),
    ``token`` decoded when a ``tokenizer`` is given (else null).
    """
    tau = check_tau(tau)
    L, H, T, _ = imp.attn.shape
    pos0 = check_position(position, T)
    parallel = imp.ffn_residual is None
    tokens = tuple(tokens if tokens is not None else getattr(imp, "tokens", None) or [""] * T)
    nodes: set[Node] = {Node(L - 1, pos0, NodeKind.BLOCK)}
    edges: list[Edge] = []
    current = {pos0}  # positions reached at the top of block l
    for l in range(L - 1, -1, -1):
        below: set[int] = set()
        for pos in sorted(current):
            top = Node(l, pos, NodeKind.BLOCK)
            if parallel:
                targets = [(top, {EdgeKind.RESIDUAL: float(imp.attn_residual[l, pos]),
                                  EdgeKind.FFN: float(imp.ffn[l, pos])})]
            else:
                mid = Node(l, pos, NodeKind.ATTN)
                parts = {EdgeKind.FFN: float(imp.ffn[l, pos]), EdgeKind.RESIDUAL: float(imp.ffn_residual[l, pos])}
                kept = {k: v for k, v in parts.items() if v > tau}
                total = sum(kept.values())
                for kind, v in kept.items():
                    edges.append(Edge(mid, top, kind, v / total))
                if not kept:
                    continue
                nodes.add(mid)
                targets = [(mid, {EdgeKind.RESIDUAL: float(imp.attn_residual[l, pos])})]
            for target, direct in targets:
                sub_kept, kept, total = _attention_parts(imp, l, pos, tau, direct)
                if total <= 0:
                    continue
                for kind, v in kept.items():
                    src = _input_node(l, pos)
                    edges.append(Edge(src, target, kind, v / total))
                    nodes.add(src)
                    below.add(pos)
                for j in np.flatnonzero(sub_kept.sum(0) > 0):
                    col = sub_kept[:, j]
                    heads = tuple(
                        HeadImportance(int(h), float(col[h] / total))
                        for h in sorted(np.flatnonzero(col > 0), key=lambda h: -col[h])
                    )
                    src = _input_node(l, int(j))
                    edges.append(Edge(src, target, EdgeKind.ATTENTION, float(col.sum() / total), heads))
                    nodes.add(src)
                    below.add(int(j))
        current = below
    return Route(
        position=pos0,
        tau=tau,
        n_layers=L,
        n_heads=H,
        parallel=parallel,
        tokens=tokens,
        nodes=tuple(sorted(nodes, key=lambda n: (n.layer if n.kind is not NodeKind.EMBED else -1,
                                                 n.kind is NodeKind.BLOCK, n.position))),
        edges=tuple(edges),
        model=model or getattr(imp, "model_name", ""),
        token_ids=tuple(int(t) for t in getattr(imp, "token_ids", ())),
        prediction=_prediction(imp, pos0, tokenizer),
    )


def _prediction(imp, pos: int, tokenizer) -> dict:
    """The model's top next token at ``pos`` (``token`` needs a tokenizer; null without one)."""
    predicted = getattr(imp, "predicted_ids", None)
    if predicted is None or len(predicted) <= pos:
        return {}
    token_id = int(predicted[pos])
    return {"token_id": token_id, "token": tokenizer.decode([token_id]) if tokenizer is not None else None}


@dataclass(frozen=True)
class RouteMasks:
    """Every position's route at once, as masks. ``P`` = T predictions (one per position)."""

    tau: float
    heads: np.ndarray  # [P, L, H] bool: head has a sub-edge in prediction p's route
    ffn: np.ndarray  # [P, L] bool: the FFN edge of layer l is in prediction p's route
    reached: np.ndarray  # [P, L + 1, T] bool: positions reached at the input of block l (l = L: top)


def route_masks(imp: Importances, tau: float) -> RouteMasks:
    """Vectorised routes for all positions: one boolean matrix product per layer instead of a graph walk.

    Agrees exactly with ``extract_route`` (the tests check heads, FFNs and reached positions).
    """
    tau = check_tau(tau)
    L, H, T, _ = imp.attn.shape
    parallel = imp.ffn_residual is None
    eye = np.eye(T, dtype=bool)
    heads = np.zeros((T, L, H), dtype=bool)
    ffn_on = np.zeros((T, L), dtype=bool)
    reached = np.zeros((T, L + 1, T), dtype=bool)
    R = eye.copy()  # [P, T] positions reached at the top of block l
    reached[:, L] = R
    for l in range(L - 1, -1, -1):
        keep = imp.attn[l] > tau  # [H, pos, j]
        res_keep = imp.attn_residual[l] > tau  # [pos]
        ffn_keep = imp.ffn[l] > tau
        if parallel:
            M = R  # the block node is fed directly
            self_keep = res_keep | ffn_keep
        else:
            through = ffn_keep | (imp.ffn_residual[l] > tau)  # the attn node is reached
            M = R & through[None, :]
            self_keep = res_keep
        ffn_on[:, l] = (R & ffn_keep[None, :]).any(1)
        edge = keep.any(0) | (eye & self_keep[:, None])  # [pos, j]
        Mf = M.astype(np.float32)
        R = (Mf @ edge.astype(np.float32)) > 0  # [P, T]
        heads[:, l, :] = (Mf @ keep.any(2).T.astype(np.float32)) > 0  # [P, H]
        reached[:, l] = R
    return RouteMasks(tau=tau, heads=heads, ffn=ffn_on, reached=reached)


# --- flow through a route -----------------------------------------------------------------------------
def route_flows(route: Route, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flow through a route (top node = 1): ``(head_flow [L, H], pair_flow [T, T], pair_importance [T, T])``.

    ``pair_*[i, j]`` (query i, source j != i) sums the route's attention edges j -> i over layers:
    ``pair_flow`` their flow, ``pair_importance`` their raw (locally renormalised) importance. A route's edge
    importances are local (renormalised at each node), so each node gets a weight: 1 at the top, and every
    edge passes ``weight(upper node) * importance`` down to its lower node.
    """

    def level(node) -> int:
        if node.kind is NodeKind.EMBED:
            return 0
        return 2 * node.layer + (1 if node.kind is NodeKind.ATTN else 2)

    weight = defaultdict(float)
    weight[route.top] = 1.0
    head_flow = np.zeros((route.n_layers, route.n_heads))
    pair_flow = np.zeros((n_tokens, n_tokens))
    pair_imp = np.zeros((n_tokens, n_tokens))
    # upper nodes first, so a node's weight is complete before its own edges pass it on
    for e in sorted(route.edges, key=lambda e: -level(e.target)):
        flow = weight[e.target] * e.importance
        weight[e.source] += flow
        if e.kind is EdgeKind.ATTENTION:
            for h in e.heads:
                head_flow[e.target.layer, h.head] += weight[e.target] * h.importance
            i, j = e.target.position, e.source.position
            if i != j:
                pair_flow[i, j] += flow
                pair_imp[i, j] += e.importance
    return head_flow, pair_flow, pair_imp
