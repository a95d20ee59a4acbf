"""The route figure: the edges a reader is told about carry their heads, labels never overprint, every layer named."""

from __future__ import annotations

import pytest

from flowray.routes import Edge, EdgeKind, HeadImportance, Node, NodeKind, Route

L, T = 30, 15  # SmolLM2's depth, the IOI prompt's length with its BOS


def _route() -> Route:
    """A hand-made route shaped like SmolLM2's IOI one: many edges out of the BOS in layer 0 (where labels
    crowd) and one weaker, long edge high up, from the indirect object to the last position."""
    def attn(layer, src, dst, importance, heads):
        return Edge(Node(layer - 1, src, NodeKind.BLOCK) if layer else Node(0, src, NodeKind.EMBED),
                    Node(layer, dst, NodeKind.ATTN), EdgeKind.ATTENTION, importance,
                    tuple(HeadImportance(h, v) for h, v in heads))

    edges = [attn(0, 0, dst, 0.2, [(dst % 9, 0.2)]) for dst in range(1, T)]  # 14 edges out of the BOS
    edges += [attn(0, dst - 1, dst, 0.2, [(0, 0.2)]) for dst in (4, 8, 11)]  # and a second edge into some
    edges.append(attn(23, 2, T - 1, 0.134, [(0, 0.077), (7, 0.057)]))  # " Mary" -> the last position
    nodes = {n for e in edges for n in (e.source, e.target)} | {Node(L - 1, T - 1, NodeKind.BLOCK)}
    return Route(position=T - 1, tau=0.04, n_layers=L, n_heads=9, parallel=False,
                 tokens=("<|endoftext|>", *[f"w{i}" for i in range(1, T)]), nodes=tuple(sorted(nodes)),
                 edges=tuple(edges), model="planted")


@pytest.fixture(scope="module")
def drawn():
    from flowray.plots import plot_route, pyplot

    fig = plot_route(_route())
    yield fig, fig.axes[0]
    pyplot().close(fig)


def test_the_long_weaker_edge_carries_its_heads(drawn):
    _, ax = drawn
    assert "L23H0,H7" in [t.get_text() for t in ax.texts]


def test_head_labels_never_overlap(drawn):
    fig, ax = drawn
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) >= 3  # the crowded layer keeps some of its labels
    overlapping = [(a.get_text(), b.get_text()) for i, a in enumerate(ax.texts) for b in ax.texts[i + 1:]
                   if boxes[ax.texts.index(a)].overlaps(boxes[ax.texts.index(b)])]
    assert not overlapping


def test_every_layer_is_labelled(drawn):
    _, ax = drawn
    assert [t.get_text() for t in ax.get_yticklabels()] == ["emb"] + [f"L{layer}" for layer in range(L)]
