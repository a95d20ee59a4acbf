"""Token-to-word alignment and universal POS tags, for every prediction of a corpus (paper Section 4.1).

Words are the spans of ``WORD_PATTERN`` (word characters, numbers such as 3.14, Penn-Treebank clitics
"n't" / "'s", and each other non-space character on its own). A token belongs to the word that holds its
first non-space character: SmolLM2's fast tokenizer gives " Mary" the span (0, 5), leading space
included, and that space must not make the token a member of the previous word. Tokens with no
non-space character (" ", "\\n", special tokens with empty spans) belong to no word (index -1).

POS tags come from NLTK's averaged perceptron tagger mapped to the universal tagset (Petrov et al.
2012), as in the paper, and every subword of a word gets its word's tag. The whole text is tagged as
one word sequence (no sentence splitting, so punkt is not needed). The tagger data is found offline by
``find_nltk_data``; when no nltk_data directory has it, the copy shipped inside the package
(``flowray/data/nltk_tagger``, xz-compressed JSON, see its NOTICE.md for provenance and licences) is used,
so a fresh machine tags too. Nothing is downloaded, no pickle is read and ``nltk.data.path`` is left untouched.
"""

from __future__ import annotations

import bisect
import json
import lzma
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from flowray.errors import InputError, MissingDependencyError

WORD_PATTERN = re.compile(
    r"""
      \w+(?=n['’]t\b)           # "do" of "don't": the tagger was trained on Treebank splits
    | n['’]t\b                  # "n't"
    | (?<=\w)['’](?:s|re|ve|ll|d|m)\b   # clitics "'s", "'re", ... right after a word
    | \d+(?:[.,:]\d+)+          # 3.14, 1,000, 10:30 stay one number
    | \w+
    | [^\w\s]                   # any other visible character is a word of its own
    """,
    re.VERBOSE,
)

_TAGGER_DIR = Path("taggers") / "averaged_perceptron_tagger_eng"
_TAGGER_FILES = ("weights", "tagdict", "classes")  # averaged_perceptron_tagger_eng.{name}.json
_UNIVERSAL_MAP = Path("taggers") / "universal_tagset" / "en-ptb.map"
_SHARED_NLTK = Path("shared") / "data" / "nltk_data"
_ENGLISH = {"en", "eng"}
# The same files shipped with flowray (MIT tagger, CC-BY-SA-4.0 map): flat, the JSON xz-compressed.
PACKAGED_TAGGER = Path(__file__).resolve().parent / "data" / "nltk_tagger"


@dataclass(frozen=True)
class TokenWords:
    """Per-token word membership and POS for one tokenized text (all lists have one entry per token)."""

    word_index: list[int]  # index of the word the token belongs to; -1 for pure-whitespace tokens
    first_subword: list[bool]  # True if the token is the first token of its word
    pos: list[str | None]  # universal POS tag of the token's word; None when unavailable


# ------------------------------------------------------------------------------------------ tagger


def _nltk_search_path() -> list[str]:
    try:
        import nltk.data
    except ImportError:  # pragma: no cover - nltk is a dependency
        return []
    return [str(p) for p in nltk.data.path if isinstance(p, (str, os.PathLike))]


def _candidate_dirs() -> list[Path]:
    """Where tagger data may live, in the order ``find_nltk_data`` tries them."""
    found = [os.environ.get(var) for var in ("FLOWRAY_NLTK_DATA", "NLTK_DATA")]
    dirs = [Path(p) for value in found if value for p in value.split(os.pathsep) if p]
    dirs += [Path(p) for p in _nltk_search_path()]
    # A checkout next to the project's shared folder (/work/main beside /work/shared) needs no setup.
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        dirs += [parent / _SHARED_NLTK for parent in (start, *start.parents)]
    return list(dict.fromkeys(dirs))


def _has_tagger_data(directory: Path) -> bool:
    files = [directory / _TAGGER_DIR / f"averaged_perceptron_tagger_eng.{name}.json" for name in _TAGGER_FILES]
    return all(f.is_file() for f in files) and (directory / _UNIVERSAL_MAP).is_file()


def find_nltk_data() -> str | None:
    """A directory holding the English tagger and the universal tagset mapping, or None.

    Tried in order: ``$FLOWRAY_NLTK_DATA``, ``$NLTK_DATA``, nltk's own search path, then a
    ``shared/data/nltk_data`` folder in the current directory, the flowray package directory or any of
    their parents. Only unzipped data counts (``taggers/averaged_perceptron_tagger_eng/*.json`` and
    ``taggers/universal_tagset/en-ptb.map``).
    """
    for directory in _candidate_dirs():
        if _has_tagger_data(directory):
            return str(directory)
    return None


class UniversalTagger:
    """NLTK's English perceptron tagger with its Penn Treebank tags mapped to the universal tagset.

    ``lookahead``: the perceptron's features read the two words after the one it tags (and the tags it
    gave the two before), so the tags of a text's first n words come out the same from its first n + 2.
    """

    lookahead = 2

    def __init__(self, directory: str):
        from nltk.tag.perceptron import PerceptronTagger

        self.directory = directory
        weights, tagdict, classes = (_read_json(path) for path in _tagger_paths(Path(directory)))
        # Loaded by hand rather than through nltk.data.find, which would need nltk.data.path changed.
        self._tagger = PerceptronTagger(load=False)
        self._tagger.model.weights = weights
        self._tagger.tagdict = tagdict
        self._tagger.classes = self._tagger.model.classes = set(classes)
        self._to_universal = _read_map(_map_path(Path(directory)))
        self._scores = _DenseScores(self._tagger.model)

    def __call__(self, words: list[str]) -> list[str]:
        """Universal tags (NOUN, VERB, ., ...) for a word sequence; unknown Treebank tags map to X."""
        if not words:
            return []
        return [self._to_universal.get(tag, "X") for tag in self._treebank(list(words))]

    def _treebank(self, words: list[str]) -> list[str]:
        """``PerceptronTagger.tag``'s loop (its own features), with each prediction's weights summed by numpy."""
        tagger = self._tagger
        prev, prev2 = tagger.START
        context = tagger.START + [tagger.normalize(w) for w in words] + tagger.END
        out = []
        for i, word in enumerate(words):
            tag = tagger.tagdict.get(word)
            if not tag:
                tag = self._scores.predict(tagger._get_features(i, word, context, prev, prev2))
            out.append(tag)
            prev2, prev = prev, tag
        return out


class _DenseScores:
    """The averaged perceptron's ``predict``, with its weights as one ``[features, classes]`` float64 matrix.

    nltk adds each present feature's weights into per-class scores, feature after feature, then takes the
    highest (ties: the largest class name). Here the same rows, in the same order, are summed by numpy along
    axis 0 (a sequential sum, as nltk's), so every score and tag is the same, ~3x faster per word.
    """

    def __init__(self, model):
        self.model = model
        self.classes = sorted(model.classes)
        column = {c: j for j, c in enumerate(self.classes)}
        self.row = {feat: r for r, feat in enumerate(model.weights)}
        rows, cols, values = [], [], []
        for r, weights in enumerate(model.weights.values()):
            for label, w in weights.items():
                rows.append(r)
                cols.append(column[label])
                values.append(w)
        self.weights = np.zeros((len(self.row), len(self.classes)))
        self.weights[rows, cols] = values

    def predict(self, features: dict) -> str:
        if sum(features.values()) != len(features):  # a repeated feature (nltk's never are): nltk's arithmetic
            return self.model.predict(features)[0]
        rows = [r for r in map(self.row.get, features) if r is not None]
        if not rows:
            return self.classes[-1]
        scores = self.weights[rows].sum(axis=0)
        return self.classes[len(self.classes) - 1 - int(scores[::-1].argmax())]  # ties: the largest name


def _tagger_paths(directory: Path) -> list[Path]:
    """weights, tagdict, classes: an nltk_data layout, or the package's flat ``*.json.xz`` copy."""
    if directory == PACKAGED_TAGGER:
        return [directory / f"averaged_perceptron_tagger_eng.{name}.json.xz" for name in _TAGGER_FILES]
    return [directory / _TAGGER_DIR / f"averaged_perceptron_tagger_eng.{name}.json" for name in _TAGGER_FILES]


def _map_path(directory: Path) -> Path:
    return directory / "en-ptb.map" if directory == PACKAGED_TAGGER else directory / _UNIVERSAL_MAP


def _read_json(path: Path):
    """Plain JSON (never pickle), xz-decompressed when the name ends in .xz."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def packaged_tagger_dir() -> str | None:
    """The tagger data shipped inside flowray, or None when the package was installed without it."""
    complete = all(p.is_file() for p in _tagger_paths(PACKAGED_TAGGER)) and _map_path(PACKAGED_TAGGER).is_file()
    return str(PACKAGED_TAGGER) if complete else None


def _read_map(path: Path) -> dict[str, str]:
    """``PTB_TAG<TAB>UNIVERSAL_TAG`` lines as a dict."""
    mapping = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            fine, coarse = line.split("\t")
            mapping[fine.strip()] = coarse.strip()
    return mapping


@lru_cache(maxsize=4)
def _load_tagger(directory: str) -> UniversalTagger:
    return UniversalTagger(directory)


def universal_tagger() -> Callable[[list[str]], list[str]]:
    """The cached English universal-tagset tagger: ``tagger(words) -> tags``.

    Uses ``find_nltk_data()``, else the copy shipped in the package. Raises MissingDependencyError, naming
    every place looked at, when neither is there.
    """
    directory = find_nltk_data() or packaged_tagger_dir()
    if directory is None:
        looked = "\n  ".join(str(d) for d in (*_candidate_dirs(), PACKAGED_TAGGER))
        raise MissingDependencyError(
            "POS tags need NLTK's English tagger data (taggers/averaged_perceptron_tagger_eng/*.json and "
            f"taggers/universal_tagset/en-ptb.map), found in none of:\n  {looked}\n"
            "Fix: reinstall flowray (its package data, flowray/data/nltk_tagger, holds a copy), set "
            "FLOWRAY_NLTK_DATA (or NLTK_DATA) to a directory holding them, such as the project's "
            "shared/data/nltk_data, or run `python -m nltk.downloader averaged_perceptron_tagger_eng "
            "universal_tagset`"
        )
    return _load_tagger(directory)


# ------------------------------------------------------------------------------------------- words


def word_spans(text: str, upto: int | None = None, more: int = 0) -> list[tuple[int, int]]:
    """Character spans [start, end) of the words of ``text`` (see WORD_PATTERN), in order.

    With ``upto``, only the words that start before character ``upto``, and then ``more`` words after them.
    """
    if upto is None:
        return [m.span() for m in WORD_PATTERN.finditer(text)]
    spans = []
    for m in WORD_PATTERN.finditer(text):
        if m.start() >= upto:
            if more <= 0:
                break
            more -= 1
        spans.append(m.span())
    return spans


def is_english(language: str) -> bool:
    """"en", "eng", "en-US", "eng_Latn" (FLORES) and the like."""
    return re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0] in _ENGLISH


def _check_offsets(text: str, offsets: list[tuple[int, int]]) -> None:
    for i, span in enumerate(offsets):
        start, end = span
        if not 0 <= start <= end <= len(text):
            raise InputError(
                f"offsets[{i}] must be a span (start, end) with 0 <= start <= end <= len(text) = {len(text)}; "
                f"got {span!r}; pass the fast tokenizer's return_offsets_mapping for this same text"
            )


def _token_word(text: str, start: int, end: int, starts: list[int], ends: list[int]) -> int:
    """Index of the word holding the first non-space character of text[start:end], or -1."""
    pos = start
    while pos < end and text[pos].isspace():
        pos += 1
    if pos == end:
        return -1
    word = bisect.bisect_right(starts, pos) - 1
    return word if word >= 0 and pos < ends[word] else -1


@dataclass(frozen=True)
class Alignment:
    """The words of the tokens of a text, before any tagging (``align_tokens``)."""

    word_index: list[int]  # per token: its word (-1: a token of no word)
    first_subword: list[bool]  # per token: the first token of its word
    spans: list[tuple[int, int]]  # the words' character spans: those the tokens touch, then a look-ahead


def align_tokens(text: str, offsets: list[tuple[int, int]], *, lookahead: int | None = None) -> Alignment:
    """Word index and first-subword flag of every token (see ``align_words``).

    ``lookahead``: None finds every word of ``text``; a number finds only the words up to the end of the
    last token and that many more (what a tagger that reads that far ahead needs): a text cut to its first
    tokens is not searched beyond them.
    """
    _check_offsets(text, offsets)
    upto = max((end for _, end in offsets), default=0)
    spans = word_spans(text) if lookahead is None else word_spans(text, upto, lookahead)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    word_index = [_token_word(text, start, end, starts, ends) for start, end in offsets]
    seen: set[int] = set()
    first_subword = []
    for word in word_index:
        first_subword.append(word >= 0 and word not in seen)
        seen.add(word)
    return Alignment(word_index, first_subword, spans)


def tag_tokens(text: str, alignment: Alignment, *, language: str = "en", tagger=None) -> list[str | None]:
    """Universal POS tag of every token's word (None: a token of no word, or a language other than English).

    The tagger sees the words of ``alignment.spans`` as one sequence (no sentence splitting); with a
    ``lookahead`` alignment these are the tokens' words and the look-ahead, not the rest of a cut text.
    """
    spans, word_index = alignment.spans, alignment.word_index
    if not is_english(language) or not spans:
        return [None] * len(word_index)
    tags = (tagger if tagger is not None else universal_tagger())([text[s:e] for s, e in spans])
    if len(tags) != len(spans):
        raise InputError(f"the tagger must return one tag per word: {len(spans)} words, got {len(tags)} tags")
    return [tags[word] if word >= 0 else None for word in word_index]


def align_words(text: str, offsets: list[tuple[int, int]], *, language: str = "en", tagger=None) -> TokenWords:
    """Word index, first-subword flag and universal POS tag of every token of ``text``.

    offsets: one (start, end) character span per token, as a fast HF tokenizer's
        ``return_offsets_mapping`` gives them (a leading space may be part of the span).
    language: POS tags are computed only for English ("en", "eng", "eng_Latn", ...); other languages
        get None for every token, since the English tagger would be meaningless there.
    tagger: a callable words -> tags; None means ``universal_tagger()`` (raises MissingDependencyError
        when its data is missing). A tagger with a ``lookahead`` attribute (``UniversalTagger``: 2) sees
        only the words the tokens touch and that many more; any other sees every word of the text.
    """
    lookahead = UniversalTagger.lookahead if tagger is None else getattr(tagger, "lookahead", None)
    alignment = align_tokens(text, offsets, lookahead=lookahead)
    pos = tag_tokens(text, alignment, language=language, tagger=tagger)
    return TokenWords(alignment.word_index, alignment.first_subword, pos)


# ------------------------------------------------------------------------------------------ tokens

# A text cut to its first tokens is encoded from a prefix of about this many characters per token needed
# (doubled until enough tokens come out), cut where a word ends and a space follows; the last
# PREFIX_MARGIN tokens of the prefix are not trusted (a tokenizer may merge across the cut).
CHARS_PER_TOKEN = 6
PREFIX_MARGIN = 8
_WORD_END = re.compile(r"\S(?=\s)")


def encode_kept(tokenizer, text: str, need: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (no special tokens), or of only its first ``need`` (or fewer).

    The first ``need`` tokens are those of the whole text's encoding: the prefix encoded ends where a
    word ends and a space follows, and holds at least ``PREFIX_MARGIN`` more tokens than are kept. With a
    text shorter than that (or with no such place), the whole text is encoded.
    """
    chars = CHARS_PER_TOKEN * (need + PREFIX_MARGIN) if need is not None else len(text)
    while chars < len(text):
        end = _WORD_END.search(text, chars - 1)
        if end is None:
            break
        ids, offsets = _encode(tokenizer, text[: end.end()])
        if len(ids) >= need + PREFIX_MARGIN:
            return ids[:need], offsets[:need]
        chars *= 2
    ids, offsets = _encode(tokenizer, text)
    return (ids, offsets) if need is None else (ids[:need], offsets[:need])


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


# ---------------------------------------------------------------------------------- start of text

# Tried in order when the tokenizer adds no BOS of its own: the pretraining document separator of
# GPT-2, SmolLM2, Qwen, Pythia and most BPE models, then the tokenizer's declared BOS / EOS.
DOCUMENT_SEPARATORS = ("<|endoftext|>",)


@dataclass(frozen=True)
class DocumentStart:
    """The token put at position 0 of every text when ``prepend_bos`` is on (paper: Llama 2's BOS)."""

    token_id: int
    token: str
    source: str  # "tokenizer BOS" (the tokenizer adds it itself) or "document separator"

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "token": self.token, "source": self.source}


def document_start(tokenizer) -> DocumentStart:
    """The BOS a text starts with: the tokenizer's own when it adds one (Llama, Gemma), else the model's
    document separator (``<|endoftext|>`` for GPT-2 and SmolLM2), else its EOS or declared BOS token.

    Heads with nothing to do park their attention on that first token; without it they park on the
    first word of the text, which then looks important and breaks "silent on first subwords".
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    if bos is not None and probe and probe[0] == bos:
        return DocumentStart(int(bos), str(tokenizer.bos_token), "tokenizer BOS")
    vocab = tokenizer.get_vocab()
    for name in DOCUMENT_SEPARATORS:
        if name in vocab:
            return DocumentStart(int(vocab[name]), name, "document separator")
    for attr in ("eos_token", "bos_token"):
        token = getattr(tokenizer, attr, None)
        if token is not None and token in vocab:
            return DocumentStart(int(vocab[token]), str(token), "document separator")
    raise InputError(
        "prepend_bos needs a start-of-text token, and this tokenizer adds no BOS and has no "
        f"{' / '.join(DOCUMENT_SEPARATORS)}, EOS or BOS token; set prepend_bos: false (--no-bos) to run "
        "without one")
