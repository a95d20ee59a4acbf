"""Parquet schemas of the corpus job and the pure aggregations behind its tables (numpy/pyarrow/polars).

One row per prediction (``PREDICTIONS``), one row per failed text (``ERRORS``); the reduce stage folds
prediction files into an ``Accumulator`` (memory ~ domains x components, whatever the corpus size) and
turns it into the tables the paper's sections 4 and 5 read. No torch, transformers or ray here.

Head indices are flat: ``layer * n_heads + head`` (layers 0-based). Component vectors are the paper's
section 4 vectors: ``L * H`` head importances ``sum_j e^h_{pos,j}`` (layer-major) then ``L`` FFN ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # polars is imported where the reduce uses it: actors on GPU machines write rows without it
    import polars as pl

# --- head-role criteria (paper section 4.3) ----------------------------------------------------------
MAJORITY = 0.5  # "more than half of its influence"
ROLE_FRACTION = 0.7  # "in at least 70% of the cases"
SILENT_INFLUENCE = 5e-5  # "overall influence is no more than 0.005%"
# domain specialisation: a head counts as specialised when its mean importance in the domain is at least
# SPECIALISED_RATIO times the general domain's and among the domain's top SPECIALISED_TOP_FRACTION heads
SPECIALISED_RATIO = 2.0
SPECIALISED_TOP_FRACTION = 0.05


@dataclass(frozen=True)
class TauColumns:
    """The names of the columns of one route threshold, ``<what>@<tau>`` with tau written ``f"{tau:g}"``:
    ``tau_columns(tau)`` gives them, ``column_tau(name)`` reads the tau back."""

    tau: float
    route_heads: str  # predictions: flat head ids in each prediction's route
    route_ffn: str  # predictions: layers whose FFN edge is in each prediction's route
    pruned_heads: str  # predictions: flat head ids whose pruned importance at the prediction exceeds SILENT_INFLUENCE
    silent_fraction_pruned: str  # head_roles: share of first subwords where the head is not in pruned_heads
    subword_merging_pruned: str  # head_roles: subword-merging criterion (i) and that pruned silence


_TAU_PREFIXES = {"route_heads": "route_heads", "route_ffn": "route_ffn", "pruned_heads": "pruned_heads",
                 "silent_fraction_pruned": "first_subword_silent_fraction_pruned",
                 "subword_merging_pruned": "subword_merging_pruned"}  # TauColumns field -> name before "@"


def tau_columns(tau: float) -> TauColumns:
    """The columns of ``tau``: ``tau_columns(0.01).route_heads == "route_heads@0.01"``."""
    return TauColumns(float(tau), **{field: f"{prefix}@{tau:g}" for field, prefix in _TAU_PREFIXES.items()})


def column_tau(name: str) -> float | None:
    """The tau of a ``TauColumns`` name (``"route_ffn@0.04"`` -> 0.04); None for any other column."""
    prefix, at, tau = name.rpartition("@")
    if not at or prefix not in _TAU_PREFIXES.values():
        return None
    try:
        return float(tau)
    except ValueError:
        return None


def predictions_schema(taus) -> pa.Schema:
    """One row per prediction (a position of a text). Declared once; writers and readers use it."""
    fields = [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # in the model's input (the BOS, when there is one, is 0)
        pa.field("n_tokens", pa.int32(), nullable=False),  # of the model's input, the BOS included
        pa.field("bos", pa.bool_(), nullable=False),  # the input starts with a BOS (its own row is not written)
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("token", pa.string()),
        pa.field("next_token_id", pa.int32()),  # from the text (or a task's answer); null when unknown
        pa.field("next_token", pa.string()),
        pa.field("predicted_id", pa.int32()),  # the model's top-1 next token
        pa.field("predicted_token", pa.string()),
        pa.field("word_index", pa.int32()),
        pa.field("first_subword", pa.bool_()),
        pa.field("pos", pa.string()),  # universal POS of the input token's word (null: not English / no tagger)
        pa.field("next_pos", pa.string()),  # ... of the next token's word
        pa.field("target", pa.bool_(), nullable=False),  # counted in activation/importance tables
        pa.field("component_importance", pa.list_(pa.float32())),  # [L*H + L]
        pa.field("prev_token_share", pa.list_(pa.float32())),  # [L*H] share of each head's influence on pos-1
        pa.field("same_word_share", pa.list_(pa.float32())),  # [L*H] ... on earlier subwords of the same word
        # [L*H] tasks, at the prediction under study: each head's sub-edges from the indirect object (IOI) or
        # the start year's YY (greater-than) to this position; null on every other row
        pa.field("source_edge_importance", pa.list_(pa.float32())),
    ]
    for tau in taus:
        cols = tau_columns(tau)
        fields += [pa.field(name, pa.list_(pa.uint16())) for name in (cols.route_heads, cols.route_ffn, cols.pruned_heads)]
    return pa.schema(fields)


ERRORS = pa.schema([
    pa.field("domain", pa.string(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("error_type", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
    pa.field("traceback", pa.string()),
    pa.field("n_chars", pa.int32()),
])

SHARD_INPUT = pa.schema([
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("is_task", pa.bool_(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("meta", pa.string()),  # JSON
])


# --- per-text rows ---------------------------------------------------------------------------------
def head_shares(attn: np.ndarray, word_index: np.ndarray, first_subword: np.ndarray):
    """Per prediction and head: the share of the head's influence on the previous token and on earlier
    subwords of the same word.

    attn ``[L, H, T, T]`` sub-edge importances; word_index/first_subword ``[T]``.
    Returns (head_total ``[T, L*H]``, prev ``[T, L*H]``, same_word ``[T, L*H]``); shares are NaN where
    undefined (position 0, a head with zero influence, or — for same_word — a token that is not a later
    subword: a first subword or a token of no word).
    """
    L, H, T, _ = attn.shape
    total = attn.sum(-1)  # [L, H, T]
    prev = np.full((L, H, T), np.nan, dtype=np.float32)
    if T > 1:
        idx = np.arange(1, T)
        prev[:, :, 1:] = attn[:, :, idx, idx - 1]
    same = (word_index[:, None] == word_index[None, :]) & (word_index[:, None] >= 0)  # [pos, j]
    same &= np.tri(T, k=-1, dtype=bool)  # earlier positions only
    same_word = np.einsum("lhpj,pj->lhp", attn, same.astype(attn.dtype))
    with np.errstate(invalid="ignore", divide="ignore"):
        prev = np.where(total > 0, prev / total, np.nan)
        later = ~first_subword & (word_index >= 0)  # tokens of no word are no subword at all
        same_word = np.where((total > 0) & later[None, None, :], same_word / total, np.nan)

    def flat(a):  # [L, H, T] -> [T, L*H]
        return np.ascontiguousarray(a.transpose(2, 0, 1).reshape(T, L * H)).astype(np.float32)

    return flat(total), flat(prev), flat(same_word)


def _list_column(matrix: np.ndarray, value_type) -> pa.ListArray:
    """Rows of a 2-D array as a list column (one list per row)."""
    n, k = matrix.shape
    offsets = np.arange(0, (n + 1) * k, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1), type=value_type))


def _ragged_column(rows, value_type) -> pa.ListArray:
    """One list per row; ``rows`` is a list of arrays, or an object with ``offsets`` ``[n + 1]`` and
    ``values`` (``flowray.sparse_routes.KeyRows``), taken as they are."""
    if hasattr(rows, "offsets") and hasattr(rows, "values"):
        values = np.asarray(rows.values, dtype=value_type.to_pandas_dtype())
        return pa.ListArray.from_arrays(pa.array(rows.offsets.astype(np.int32)), pa.array(values))
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(rows) if rows and lengths.sum() else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


@dataclass
class TextRows:
    """What one text contributes; ``table()`` gives the Arrow rows."""

    domain: str
    shard_id: str
    doc_id: str
    token_ids: np.ndarray  # [T]
    tokens: list[str]
    next_ids: list[int | None]  # [T]
    next_tokens: list[str | None]
    predicted_ids: np.ndarray  # [T]
    predicted_tokens: list[str]
    word_index: np.ndarray  # [T]
    first_subword: np.ndarray  # [T]
    pos: list[str | None]
    next_pos: list[str | None]
    target: np.ndarray  # [T] bool
    components: np.ndarray  # [T, L*H + L]
    prev_share: np.ndarray  # [T, L*H]
    same_word_share: np.ndarray  # [T, L*H]
    route_heads: dict = field(default_factory=dict)  # tau -> list of [T] arrays of flat head ids
    route_ffn: dict = field(default_factory=dict)  # tau -> list of [T] arrays of layers
    pruned_heads: dict = field(default_factory=dict)  # tau -> list of [T] arrays of flat head ids
    bos: bool = False  # position 0 is a BOS: its row is left out
    source_row: int | None = None  # the row whose source_edge_importance is ``source_edges``
    source_edges: np.ndarray | None = None  # [L*H]

    def table(self, schema: pa.Schema) -> pa.Table:
        T = len(self.token_ids)
        source = [None] * T
        if self.source_row is not None and self.source_edges is not None:
            source[self.source_row] = self.source_edges.astype(np.float32)
        cols = {
            "domain": pa.array([self.domain] * T, pa.string()),
            "shard_id": pa.array([self.shard_id] * T, pa.string()),
            "doc_id": pa.array([self.doc_id] * T, pa.string()),
            "position": pa.array(np.arange(T, dtype=np.int32)),
            "n_tokens": pa.array(np.full(T, T, dtype=np.int32)),
            "bos": pa.array(np.full(T, self.bos)),
            "token_id": pa.array(self.token_ids.astype(np.int32)),
            "token": pa.array(self.tokens, pa.string()),
            "next_token_id": pa.array(self.next_ids, pa.int32()),
            "next_token": pa.array(self.next_tokens, pa.string()),
            "predicted_id": pa.array(self.predicted_ids.astype(np.int32)),
            "predicted_token": pa.array(self.predicted_tokens, pa.string()),
            "word_index": pa.array(self.word_index.astype(np.int32)),
            "first_subword": pa.array(self.first_subword.astype(bool)),
            "pos": pa.array(self.pos, pa.string()),
            "next_pos": pa.array(self.next_pos, pa.string()),
            "target": pa.array(self.target.astype(bool)),
            "component_importance": _list_column(np.asarray(self.components, dtype=np.float32), pa.float32()),
            "prev_token_share": _list_column(self.prev_share, pa.float32()),
            "same_word_share": _list_column(self.same_word_share, pa.float32()),
            "source_edge_importance": pa.array(source, pa.list_(pa.float32())),
        }
        for tau, rows in self.route_heads.items():
            cols[tau_columns(tau).route_heads] = _ragged_column(rows, pa.uint16())
        for tau, rows in self.route_ffn.items():
            cols[tau_columns(tau).route_ffn] = _ragged_column(rows, pa.uint16())
        for tau, rows in self.pruned_heads.items():
            cols[tau_columns(tau).pruned_heads] = _ragged_column(rows, pa.uint16())
        table = pa.table([cols[f.name] for f in schema], schema=schema)
        return table.slice(1) if self.bos else table  # the BOS position is no prediction of the text


# --- reduce ----------------------------------------------------------------------------------------
@dataclass
class _DomainStats:
    n_layers: int
    n_heads: int
    taus: tuple
    texts: set = field(default_factory=set)
    n_rows: int = 0
    n_target: int = 0
    head_active: dict = field(default_factory=dict)  # tau -> [L*H] counts over target rows
    ffn_active: dict = field(default_factory=dict)  # tau -> [L]
    comp_sum: np.ndarray | None = None  # [L*H + L] over target rows
    role_counts: dict = field(default_factory=dict)  # _role_count_names key -> [L*H] (cases: ints)
    pos_sum: dict = field(default_factory=dict)  # (kind, tag) -> [L*H + L] sum over target rows
    pos_n: dict = field(default_factory=dict)
    source_edges: dict = field(default_factory=dict)  # doc_id -> [L*H] (tasks: source_edge_importance)

    def __post_init__(self):
        LH, L = self.n_layers * self.n_heads, self.n_layers
        self.comp_sum = np.zeros(LH + L)
        self.role_counts = {name: np.zeros(LH) for name in _role_count_names(self.taus)}
        self.role_counts.update({name: 0 for name in _CASES})
        for tau in self.taus:
            self.head_active[tau] = np.zeros(LH)
            self.ffn_active[tau] = np.zeros(L)


# Denominators of the head-role criteria (see Accumulator.update and the head_roles docs):
_CASES = ("cases_previous", "cases_later_subword", "cases_first_subword")


def _role_count_names(taus) -> list:
    return ["previous_major", "previous_zero_influence", "same_word_major", "later_subword_zero_influence",
            "first_subword_silent", *(("first_subword_silent_pruned", tau) for tau in taus)]


def _matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-width list column as a ``[rows, width]`` float array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), width) if len(arr) else np.zeros((0, width))


class Accumulator:
    """Folds prediction batches (Arrow tables) into per-domain counts; ``tables()`` finalises them."""

    def __init__(self, n_layers: int, n_heads: int, taus, general_domain: str, contrasts=()):
        """``contrasts``: ``(original_domain, contrastive_domain)`` pairs of task domains whose texts are
        paired by doc_id (``flowray.corpora`` gives a prompt and its twin the same id)."""
        self.L, self.H = n_layers, n_heads
        self.taus = tuple(taus)
        self.general = general_domain
        self.contrasts = tuple(tuple(pair) for pair in contrasts)
        self.domains: dict[str, _DomainStats] = {}

    def _stats(self, domain: str) -> _DomainStats:
        if domain not in self.domains:
            self.domains[domain] = _DomainStats(self.L, self.H, self.taus)
        return self.domains[domain]

    def update(self, table: pa.Table) -> None:
        LH = self.L * self.H
        for domain in _unique(table.column("domain")):
            part = table.filter(pc.equal(table.column("domain"), domain))
            st = self._stats(domain)
            st.texts.update(part.column("doc_id").to_pylist())
            st.n_rows += part.num_rows
            target = part.column("target").to_numpy(zero_copy_only=False).astype(bool)
            position = part.column("position").to_numpy()
            first = part.column("first_subword").to_numpy(zero_copy_only=False).astype(bool)
            comps = _matrix(part.column("component_importance"), LH + self.L)
            st.n_target += int(target.sum())
            st.comp_sum += comps[target].sum(0)
            word = part.column("word_index").to_numpy(zero_copy_only=False)
            bos = part.column("bos").to_numpy(zero_copy_only=False).astype(int)
            self._roles_update(st, part, position, bos, word, first, comps[:, :LH])
            self._sources_update(st, part)
            for tau in self.taus:
                cols = tau_columns(tau)
                heads = part.column(cols.route_heads).filter(pa.array(target))
                flat = heads.combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(heads) else []
                st.head_active[tau] += np.bincount(np.asarray(flat, dtype=np.int64), minlength=LH)[:LH]
                ffn = part.column(cols.route_ffn).filter(pa.array(target))
                flat = ffn.combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(ffn) else []
                st.ffn_active[tau] += np.bincount(np.asarray(flat, dtype=np.int64), minlength=self.L)[: self.L]
            for kind in ("pos", "next_pos"):
                tags = np.asarray(part.column(kind).to_pylist(), dtype=object)
                for tag in set(tags[target].tolist()) - {None}:
                    rows = target & (tags == tag)
                    key = (kind, tag)
                    st.pos_sum[key] = st.pos_sum.get(key, 0) + comps[rows].sum(0)
                    st.pos_n[key] = st.pos_n.get(key, 0) + int(rows.sum())

    def _roles_update(self, st: _DomainStats, part: pa.Table, position, bos, word, first, heads) -> None:
        """Count each head's role cases (paper section 4.3), with these denominators:

        - previous-token cases: rows whose previous token is a text token (``position >= 1 + bos``); a
          case counts when the head puts more than half of its influence on it;
        - later-subword cases: tokens of a word that are not its first token (tokens of no word, such as
          whitespace or the BOS, are neither first nor later subwords); a case counts when more than half
          of the head's influence is on earlier subwords of the same word;
        - first-subword cases: the first token of each word; the head is silent there when its summed
          raw importance is <= SILENT_INFLUENCE, or (pruned, per tau) when it is not in ``pruned_heads@tau``.

        A head with zero influence in a previous-token or later-subword case (its share is undefined)
        counts as a failure there and is counted in ``*_zero_influence``.
        """
        c = st.role_counts
        LH = self.L * self.H
        prev = _matrix(part.column("prev_token_share"), LH)
        same = _matrix(part.column("same_word_share"), LH)
        has_prev = position >= 1 + bos
        later = (word >= 0) & ~first
        c["cases_previous"] += int(has_prev.sum())
        c["previous_major"] += np.nan_to_num(prev[has_prev] > MAJORITY).sum(0)
        c["previous_zero_influence"] += (heads[has_prev] <= 0).sum(0)
        c["cases_later_subword"] += int(later.sum())
        c["same_word_major"] += np.nan_to_num(same[later] > MAJORITY).sum(0)
        c["later_subword_zero_influence"] += (heads[later] <= 0).sum(0)
        n_first = int(first.sum())
        c["cases_first_subword"] += n_first
        c["first_subword_silent"] += (heads[first] <= SILENT_INFLUENCE).sum(0)
        for tau in self.taus:
            active = part.column(tau_columns(tau).pruned_heads).filter(pa.array(first))
            flat = active.combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(active) else []
            c[("first_subword_silent_pruned", tau)] += n_first - np.bincount(
                np.asarray(flat, dtype=np.int64), minlength=LH)[:LH]

    def _sources_update(self, st: _DomainStats, part: pa.Table) -> None:
        col = part.column("source_edge_importance")
        if col.null_count == len(col):
            return
        keep = pc.is_valid(col)
        docs = part.column("doc_id").filter(keep).to_pylist()
        values = _matrix(col.filter(keep), self.L * self.H)
        for doc, row in zip(docs, values):
            st.source_edges[doc] = row

    # --- finalise ---------------------------------------------------------------------------------
    def _layer_head(self):
        layers = np.repeat(np.arange(self.L), self.H)
        heads = np.tile(np.arange(self.H), self.L)
        return layers, heads

    def tables(self) -> dict[str, pl.DataFrame]:
        import polars as pl
        layers, heads = self._layer_head()
        LH = self.L * self.H
        act, ffn_act, comp, roles, pos_rows, summary = [], [], [], [], [], []
        for domain, st in sorted(self.domains.items()):
            n = max(st.n_target, 1)
            summary.append({"domain": domain, "texts": len(st.texts), "predictions": st.n_rows,
                            "target_predictions": st.n_target})
            for tau in self.taus:
                act.append(pl.DataFrame({"domain": domain, "tau": float(tau), "layer": layers, "head": heads,
                                         "frequency": st.head_active[tau] / n, "n_predictions": st.n_target}))
                ffn_act.append(pl.DataFrame({"domain": domain, "tau": float(tau), "layer": np.arange(self.L),
                                             "frequency": st.ffn_active[tau] / n, "n_predictions": st.n_target}))
            mean = st.comp_sum / n
            comp.append(pl.DataFrame({"domain": domain, "component": ["head"] * LH + ["ffn"] * self.L,
                                      "layer": np.concatenate([layers, np.arange(self.L)]),
                                      "head": [int(h) for h in heads] + [None] * self.L,
                                      "importance": mean}))
            roles.append(self._roles(domain, st.role_counts))
            for (kind, tag), total in sorted(st.pos_sum.items()):
                count = st.pos_n[(kind, tag)]
                pos_rows.append(pl.DataFrame({
                    "domain": domain, "pos_of": "input" if kind == "pos" else "next", "pos": tag, "n": count,
                    "component": ["head"] * LH + ["ffn"] * self.L,
                    "layer": np.concatenate([layers, np.arange(self.L)]),
                    "head": [int(h) for h in heads] + [None] * self.L, "importance": total / count}))
        # roles over every domain together
        if self.domains:
            sts = list(self.domains.values())
            roles.append(self._roles("*all*", {k: sum(s.role_counts[k] for s in sts) for k in sts[0].role_counts}))
        component = pl.concat(comp) if comp else pl.DataFrame()
        return {
            "head_activation": pl.concat(act) if act else pl.DataFrame(),
            "ffn_activation": pl.concat(ffn_act) if ffn_act else pl.DataFrame(),
            "component_importance": component,
            "head_roles": pl.concat(roles) if roles else pl.DataFrame(),
            "domain_specialisation": specialisation(component, self.general) if comp else pl.DataFrame(),
            "pos_importance": pl.concat(pos_rows) if pos_rows else pl.DataFrame(),
            "domain_summary": pl.DataFrame(summary),
            "contrastive_edges": self._contrastive_edges(),
        }

    def _roles(self, domain: str, c: dict) -> pl.DataFrame:
        """One row per head. ``role`` uses the raw silence (see ``head_roles`` in the README): pruned,
        renormalised importances are either 0 or above tau, so the paper's 0.005% threshold only has a
        meaning for raw ones; the pruned fractions are reported beside it."""
        import polars as pl
        layers, heads = self._layer_head()
        prev_n, later_n, first_n = c["cases_previous"], c["cases_later_subword"], c["cases_first_subword"]
        prev_frac = c["previous_major"] / max(prev_n, 1)
        same_frac = c["same_word_major"] / max(later_n, 1)
        silent_frac = c["first_subword_silent"] / max(first_n, 1)
        is_prev = (prev_frac >= ROLE_FRACTION) & (prev_n > 0)
        merging = (same_frac >= ROLE_FRACTION) & ~is_prev & (later_n > 0)  # criterion (i), not previous-token
        is_merge = merging & (silent_frac >= ROLE_FRACTION)
        role = np.where(is_prev, "previous_token", np.where(is_merge, "subword_merging", None))
        pruned = {}
        for tau in self.taus:
            cols = tau_columns(tau)
            silent = c[("first_subword_silent_pruned", tau)] / max(first_n, 1)
            pruned[cols.silent_fraction_pruned] = silent
            pruned[cols.subword_merging_pruned] = merging & (silent >= ROLE_FRACTION)  # (ii) after pruning
        return pl.DataFrame({
            "domain": domain, "layer": layers, "head": heads,
            "previous_token_fraction": prev_frac, "subword_merging_fraction": same_frac,
            "first_subword_silent_fraction": silent_frac, **pruned,
            "cases_previous": prev_n, "cases_later_subword": later_n, "cases_first_subword": first_n,
            "previous_zero_influence": c["previous_zero_influence"].astype(np.int64),
            "later_subword_zero_influence": c["later_subword_zero_influence"].astype(np.int64),
            "role": pl.Series(role.tolist(), dtype=pl.String),
        })

    def _contrastive_edges(self) -> pl.DataFrame:
        """Per head, the source sub-edge importance on each prompt minus on its twin: mean and standard error."""
        import polars as pl
        layers, heads = self._layer_head()
        frames = []
        for original, twin in self.contrasts:
            a = self.domains.get(original)
            b = self.domains.get(twin)
            docs = sorted(set(a.source_edges) & set(b.source_edges)) if a and b else []
            if not docs:
                continue
            x = np.stack([a.source_edges[d] for d in docs])  # [n, L*H]
            y = np.stack([b.source_edges[d] for d in docs])
            diff = x - y
            n = len(docs)
            se = diff.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(diff.shape[1], np.nan)
            frames.append(pl.DataFrame({
                "domain": original, "contrastive_domain": twin, "layer": layers, "head": heads, "n_pairs": n,
                "original": x.mean(0), "contrastive": y.mean(0), "difference": diff.mean(0), "se": se}))
        if not frames:
            return pl.DataFrame(schema={"domain": pl.String, "contrastive_domain": pl.String, "layer": pl.Int64,
                                        "head": pl.Int64, "n_pairs": pl.Int64, "original": pl.Float64,
                                        "contrastive": pl.Float64, "difference": pl.Float64, "se": pl.Float64})
        return pl.concat(frames)


def specialisation(component: pl.DataFrame, general: str) -> pl.DataFrame:
    """Each domain's mean head importance next to the general domain's; flags specialised heads."""
    import polars as pl
    heads = component.filter(pl.col("component") == "head").select("domain", "layer", "head", "importance")
    gen = heads.filter(pl.col("domain") == general).select("layer", "head",
                                                            pl.col("importance").alias("general_importance"))
    out = heads.join(gen, on=["layer", "head"], how="left").with_columns(
        (pl.col("importance") - pl.col("general_importance")).alias("difference"),
        (pl.col("importance") / pl.col("general_importance")).alias("ratio"),
        pl.col("importance").rank(descending=True, method="min").over("domain").alias("rank_in_domain"),
    )
    n_heads = heads.group_by("domain").len().select(pl.col("len").max()).item() if heads.height else 0
    top = max(1, int(round(SPECIALISED_TOP_FRACTION * n_heads)))
    return out.with_columns(
        ((pl.col("domain") != general) & (pl.col("ratio") >= SPECIALISED_RATIO)
         & (pl.col("rank_in_domain") <= top)).alias("specialised")
    ).sort("domain", "layer", "head")


def _unique(column) -> list[str]:
    return sorted(set(pc.unique(column).to_pylist()))
