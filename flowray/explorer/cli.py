"""``flowray explore``: the subcommand's parser and handler (registered by ``flowray.cli``).

It takes the route command's model and text options and validators from ``flowray.cli``, so bad input
gets the same messages as ``flowray route``.
"""

from __future__ import annotations

from pathlib import Path

from flowray.errors import InputError


def register_cli(sub) -> None:
    from flowray.cli import _add_model_args, _add_text_args, positive_int, tau_arg

    p = sub.add_parser("explore", help="write an interactive route explorer: one self-contained, offline HTML page")
    _add_model_args(p)
    _add_text_args(p)
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
                   help="the .html page (with --file: one page with a text selector)")
    p.set_defaults(handler=cmd_explore)


def cmd_explore(args) -> int:
    from flowray.cli import _check_texts, _load, _progress, read_texts
    from flowray.explorer.build import prompt_view
    from flowray.explorer.page import check_html_path, write_explorer
    from flowray.io_checks import check_output_file

    texts = [args.text] if args.text is not None else read_texts(args.file)
    if args.compare is not None:
        if args.file is not None:
            raise InputError("--compare pairs one --text with a second text; it cannot be used with --file")
        texts.append(args.compare)
    _check_texts(texts)
    check_output_file(args.out, "--out")  # the route command's checks first: the same errors for the same input
    check_html_path(args.out)
    lm = _load(args)
    views = [prompt_view(lm, text, position=args.position, max_tokens=args.max_tokens, top_k=args.top_k,
                         backend=args.backend, chunk_size=args.chunk_size, prepend_bos=args.prepend_bos)
             for text in _progress(texts, len(texts), "prompts")]
    path = write_explorer(views, args.out, compare=args.compare is not None, tau=args.tau, title=args.title)
    for i, v in enumerate(views):  # every text's prediction, as the page opens on it
        top = v.vocab[int(v.top_ids[v.position, 0])]
        label = f"text {i}: " if len(views) > 1 else ""
        print(f"{label}position {v.position} ({v.imp.tokens[v.position]!r}) predicts {top!r} "
              f"(p = {float(v.top_probs[v.position, 0]):.3f})")
    print(f"explorer: {path} ({len(views)} prompt{'s' if len(views) > 1 else ''}, "
          f"{path.stat().st_size / 1e6:.2f} MB, opens offline in any browser)")
    return 0
