"""``flowray explore``: the subcommand's parser and handler (registered by ``flowray.cli``).

Its model and text options and their checks are the route command's (``flowray.cli_common``), so bad
input gets the same messages as ``flowray route``.
"""

from __future__ import annotations

from pathlib import Path

from flowray.cli_common import (add_model_args, add_text_args, check_texts, load_model_from_args, progress,
                                texts_from_args)
from flowray.cli_types import positive_int, tau_arg
from flowray.errors import InputError
from flowray.explorer.size import MAX_PAGE_MB


def register_cli(sub) -> None:
    from flowray.cli_types import positive_float

    p = sub.add_parser("explore", help="write an interactive route explorer: one self-contained, offline HTML page")
    add_model_args(p)
    add_text_args(p)
    p.add_argument("--tau", type=tau_arg, default=0.04,
                   help="the threshold the page opens with, in (0, 1) (default 0.04; a slider changes it)")
    p.add_argument("--position", type=int, default=-1,
                   help="the prediction the page opens with (default -1: the last token; a selector changes it)")
    p.add_argument("--compare", metavar="TEXT", default=None,
                   help="a second text shown side by side with --text (e.g. the ABC twin of an IOI prompt), "
                   "with the difference of head activations highlighted")
    p.add_argument("--top-k", type=positive_int, default=5, help="tokens shown per logit lens and prediction")
    p.add_argument("--title", default="", help="page title (default: the model name)")
    p.add_argument("--out", type=Path, required=True,
                   help="the .html page (with --file: one page with a text selector). It holds every importance, "
                   "so it grows as tokens^2: about 2.7 bytes x layers x heads x tokens^2 (SmolLM2, 30 x 9 heads: "
                   "~3.5 MB at 64 tokens, ~117 MB at 400)")
    p.add_argument("--max-page-mb", type=positive_float, default=MAX_PAGE_MB,
                   help=f"refuse, before the model runs, a page larger than this (default {MAX_PAGE_MB} MB: "
                   "headless Chromium opened a 130 MB page in ~3 s and a 357 MB one in ~10 s; a page of ~540 MB or "
                   "more cannot be parsed at all, its data being one string over V8's limit); the error gives the "
                   "--max-tokens that fits")
    p.set_defaults(handler=cmd_explore)


def cmd_explore(args) -> int:
    from flowray.explorer.build import check_page_fits, prompt_view
    from flowray.explorer.page import check_html_path, write_explorer
    from flowray.io_checks import check_output_file

    texts = texts_from_args(args)
    if args.compare is not None:
        if args.file is not None:
            raise InputError("--compare pairs one --text with a second text; it cannot be used with --file")
        texts.append(args.compare)
    check_texts(texts)
    check_output_file(args.out, "--out")  # the route command's checks first: the same errors for the same input
    check_html_path(args.out)
    lm = load_model_from_args(args)
    check_page_fits(lm, texts, max_tokens=args.max_tokens, top_k=args.top_k, prepend_bos=args.prepend_bos,
                    max_page_mb=args.max_page_mb)
    views = [prompt_view(lm, text, position=args.position, max_tokens=args.max_tokens, top_k=args.top_k,
                         backend=args.backend, chunk_size=args.chunk_size, prepend_bos=args.prepend_bos)
             for text in progress(texts, len(texts), "prompts")]
    path = write_explorer(views, args.out, compare=args.compare is not None, tau=args.tau, title=args.title)
    for i, v in enumerate(views):  # every text's prediction, as the page opens on it
        top = v.vocab[int(v.top_ids[v.position, 0])]
        label = f"text {i}: " if len(views) > 1 else ""
        print(f"{label}position {v.position} ({v.imp.tokens[v.position]!r}) predicts {top!r} "
              f"(p = {float(v.top_probs[v.position, 0]):.3f})")
    print(f"explorer: {path} ({len(views)} prompt{'s' if len(views) > 1 else ''}, "
          f"{path.stat().st_size / 1e6:.2f} MB, opens offline in any browser)")
    return 0
