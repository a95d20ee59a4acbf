"""``flowray.explorer``: model + texts -> one self-contained HTML page (importances, logit lens, predictions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowray.errors import InputError
from flowray.explorer.data import PromptView
from flowray.explorer.page import check_html_path, write_explorer
from flowray.explorer.size import MAX_PAGE_MB, check_page_size
from flowray.routes import check_position, check_tau


def prompt_view(lm, text: str, *, position: int = -1, max_tokens: int | None = None, top_k: int = 5,
                backend: str = "auto", chunk_size: int | None = None, prepend_bos: bool = True) -> PromptView:
    """Importances, logit lens and predictions of one text (two forward passes)."""
    from flowray.api import edge_importances, encode_text
    from flowray.explorer.lens import logit_lens

    ids = encode_text(lm.tokenizer, text, max_tokens=max_tokens, context=lm.adapter.shape.max_positions,
                      prepend_bos=prepend_bos)
    imp = edge_importances(lm, ids, chunk_size=chunk_size, backend=backend)
    position = check_position(position, imp.n_tokens)
    lens_ids, lens_probs, top_ids, top_probs = logit_lens(lm, ids, k=top_k)
    used = np.unique(np.concatenate([lens_ids.ravel(), top_ids.ravel()]))
    vocab = {int(i): lm.tokenizer.decode([int(i)]) for i in used}
    return PromptView(imp=imp, text=text, lens_ids=lens_ids, lens_probs=lens_probs, top_ids=top_ids,
                      top_probs=top_probs, vocab=vocab, position=position, model=lm.name)


def check_page_fits(lm, texts: list[str], *, max_tokens: int | None, top_k: int, prepend_bos: bool,
                    max_page_mb: float) -> None:
    """Refuse, before any forward pass, a page too big for a browser (``flowray.explorer.size``)."""
    from flowray.api import encode_text

    s = lm.adapter.shape
    lengths = [int(encode_text(lm.tokenizer, t, max_tokens=max_tokens, context=s.max_positions,
                               prepend_bos=prepend_bos).shape[1]) for t in texts]
    check_page_size(s.n_layers, s.n_heads, s.parallel, lengths, top_k, max_page_mb, lead=int(prepend_bos))


def _as_loaded(model, tokenizer, device: str):
    from flowray.models.loading import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model, device=device)
    if tokenizer is None:
        raise InputError("explore needs a tokenizer with a plain HF model: pass tokenizer=..., or give a "
                         "flowray.LoadedModel / a model spec such as 'smollm2'")
    from flowray.models.families import adapter_for

    return LoadedModel(model.eval(), tokenizer, adapter_for(model), getattr(model.config, "name_or_path", "") or "")


def explore(model, text: str | list[str], out: str | Path = "route.html", *, compare: str | None = None,
            tau: float = 0.04, position: int = -1, max_tokens: int | None = None, top_k: int = 5,
            backend: str = "auto", chunk_size: int | None = None, tokenizer=None, device: str = "auto",
            title: str = "", prepend_bos: bool = True, max_page_mb: float = MAX_PAGE_MB) -> Path:
    """Write an interactive route explorer for ``text`` (or several texts, with a selector) to ``out``.

    ``model``: a ``flowray.LoadedModel``, a model spec (``"smollm2"``, a directory, a .gguf file) or a HF
    causal LM with ``tokenizer``. ``compare``: a second text shown side by side with ``text`` (e.g. the
    ABC twin of an IOI prompt), head activation differences highlighted. ``tau`` and ``position`` are what
    the page shows first; both change in the browser. ``prepend_bos``: a BOS at position 0 (see
    ``flowray.api.encode_text``). A page bigger than ``max_page_mb`` is refused before the model runs (it
    grows as tokens^2; see ``flowray.explorer.size``). Returns the path written.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise InputError("explore needs at least one text")
    if compare is not None:
        if len(texts) != 1:
            raise InputError(f"compare shows two prompts side by side: give one text and compare=...; got {len(texts)} texts")
        texts.append(compare)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            where = "" if len(texts) == 1 else f" (text {i})"
            raise InputError(f"text{where} is empty or only whitespace; got {t!r}; give at least one word")
    check_tau(tau)
    check_html_path(Path(out))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a positive integer; got {top_k!r}")
    lm = _as_loaded(model, tokenizer, device)
    check_page_fits(lm, texts, max_tokens=max_tokens, top_k=top_k, prepend_bos=prepend_bos, max_page_mb=max_page_mb)
    views = [prompt_view(lm, t, position=position, max_tokens=max_tokens, top_k=top_k, backend=backend,
                         chunk_size=chunk_size, prepend_bos=prepend_bos) for t in texts]
    return write_explorer(views, out, compare=compare is not None, tau=tau, title=title)
