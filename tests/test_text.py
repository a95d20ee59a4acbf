"""flowray.text: token-to-word alignment, first subwords, universal POS tags, offline tagger data."""

from __future__ import annotations

import json
import time

import pytest
from conftest import SHARED_DATA, needs_shared, needs_shared_nltk

from flowray import text as ftext
from flowray.errors import InputError, MissingDependencyError
from flowray.text import TokenWords, align_words, find_nltk_data, is_english, universal_tagger, word_spans

NLTK_DATA = SHARED_DATA / "nltk_data"
FILES = [
    "taggers/averaged_perceptron_tagger_eng/averaged_perceptron_tagger_eng.weights.json",
    "taggers/averaged_perceptron_tagger_eng/averaged_perceptron_tagger_eng.tagdict.json",
    "taggers/averaged_perceptron_tagger_eng/averaged_perceptron_tagger_eng.classes.json",
    "taggers/universal_tagset/en-ptb.map",
]


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def encode(tok, text):
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return [tok.decode([i]) for i in enc["input_ids"]], enc["offset_mapping"]


def words_of(text):
    return [text[s:e] for s, e in word_spans(text)]


class Recorder:
    """A stand-in tagger that remembers its input and tags every word with its length."""

    def __init__(self):
        self.calls = []

    def __call__(self, words):
        self.calls.append(list(words))
        return [f"L{len(w)}" for w in words]


def fake_data_dir(root):
    for rel in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    return root


# ------------------------------------------------------------------------------------- alignment


def test_hand_made_offsets_multi_token_words_spaces_and_punctuation():
    text = " unbelievable 2024!"
    # " unbelie" "vable" " " "2" "0" "2" "4" "!" — spans include a token's leading space, as SmolLM2's do
    offsets = [(0, 8), (8, 13), (13, 14), (14, 15), (15, 16), (16, 17), (17, 18), (18, 19)]
    tagger = Recorder()
    tw = align_words(text, offsets, tagger=tagger)
    assert isinstance(tw, TokenWords)
    assert tagger.calls == [["unbelievable", "2024", "!"]]
    assert tw.word_index == [0, 0, -1, 1, 1, 1, 1, 2]
    assert tw.first_subword == [True, False, False, True, False, False, False, True]
    assert tw.pos == ["L12", "L12", None, "L4", "L4", "L4", "L4", "L1"]


def test_a_leading_space_does_not_join_the_previous_word():
    text = "big cat"
    tw = align_words(text, [(0, 3), (3, 7)], tagger=Recorder())  # "big", " cat"
    assert tw.word_index == [0, 1] and tw.first_subword == [True, True]


def test_special_tokens_and_whitespace_tokens_belong_to_no_word():
    text = "Hi\n\nthere"
    tw = align_words(text, [(0, 0), (0, 2), (2, 3), (3, 4), (4, 9)], tagger=Recorder())
    assert tw.word_index == [-1, 0, -1, -1, 1]
    assert tw.first_subword == [False, True, False, False, True]
    assert tw.pos == [None, "L2", None, None, "L5"]


def test_smollm2_offsets(tok):
    text = "It was unbelievable in 2024, wasn't it?  Yes.\n\nNo"
    pieces, offsets = encode(tok, text)
    tw = align_words(text, offsets, tagger=Recorder())
    words = words_of(text)
    by_token = [words[w] if w >= 0 else None for w in tw.word_index]
    assert list(zip(pieces, by_token, strict=True))[:10] == [
        ("It", "It"), (" was", "was"), (" unbelie", "unbelievable"), ("vable", "unbelievable"), (" in", "in"),
        (" ", None), ("2", "2024"), ("0", "2024"), ("2", "2024"), ("4", "2024"),
    ]
    assert tw.first_subword[2:4] == [True, False] and tw.first_subword[6:10] == [True, False, False, False]
    assert all(w == -1 for p, w in zip(pieces, tw.word_index, strict=True) if not p.strip())
    assert sum(tw.first_subword) == len(words)  # every word has exactly one first token here


def test_word_splitting_follows_treebank_conventions():
    assert words_of("I don't know, it's 3.14 or 1,000 at 10:30!") == [
        "I", "do", "n't", "know", ",", "it", "'s", "3.14", "or", "1,000", "at", "10:30", "!"]
    assert words_of("'daring' (yes)") == ["'", "daring", "'", "(", "yes", ")"]
    assert word_spans("") == []


def test_non_english_text_gets_no_pos_but_is_aligned(tok):
    text = "Привет мир"

    def must_not_run(words):
        raise AssertionError("the English tagger must not see Russian")

    pieces, offsets = encode(tok, text)
    tw = align_words(text, offsets, language="ru", tagger=must_not_run)
    assert tw.pos == [None] * len(pieces)
    # byte-level tokens split "П" in two (both spans (0, 1)); they still belong to the first word
    assert tw.word_index == [0, 0, 0, 0, 0, 1, 1, 1]
    assert tw.first_subword == [True, False, False, False, False, True, False, False]
    assert align_words(text, offsets, language="rus_Cyrl", tagger=must_not_run).pos == tw.pos


def test_is_english():
    assert all(is_english(x) for x in ["en", "EN", "eng", "en-US", "eng_Latn", "en_GB"])
    assert not any(is_english(x) for x in ["ru", "rus_Cyrl", "english", "ita_Latn", "es"])


@pytest.mark.parametrize("bad", [[(0, 99)], [(3, 2)], [(-1, 1)]])
def test_bad_offsets_are_an_input_error(bad):
    with pytest.raises(InputError, match=r"offsets\[0\] must be a span .* got"):
        align_words("short", bad, tagger=Recorder())


def test_a_tagger_returning_the_wrong_number_of_tags_is_an_input_error():
    with pytest.raises(InputError, match="one tag per word: 2 words, got 1 tags"):
        align_words("a b", [(0, 1), (1, 3)], tagger=lambda words: ["X"])


# -------------------------------------------------------------------------------------- POS tags


def test_simple_sentence_pos(tok):
    text = "The cat sat on the mat."
    _, offsets = encode(tok, text)
    assert align_words(text, offsets).pos == ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN", "."]


@needs_shared_nltk
def test_tags_match_nltk_pos_tag_universal(monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(NLTK_DATA)])
    with open(SHARED_DATA / "c4_sample" / "c4_en_sample_1000.jsonl") as f:
        docs = [json.loads(next(f))["text"] for _ in range(5)]
    for doc in docs:
        words = words_of(doc)
        assert universal_tagger()(words) == [t for _, t in nltk.pos_tag(words, tagset="universal")]


def test_every_subword_gets_its_word_tag(tok):
    text = "Unbelievably, the transmogrification happened in 2024."
    pieces, offsets = encode(tok, text)
    tw = align_words(text, offsets)
    for i in range(1, len(pieces)):
        if tw.word_index[i] == tw.word_index[i - 1] >= 0:
            assert tw.pos[i] == tw.pos[i - 1] and not tw.first_subword[i]
    assert {tw.pos[i] for i, p in enumerate(pieces) if p.strip().isdigit()} == {"NUM"}


@needs_shared
def test_tagger_is_cached_and_a_document_is_fast(tok):
    assert universal_tagger() is universal_tagger()
    with open(SHARED_DATA / "c4_sample" / "c4_en_sample_1000.jsonl") as f:
        doc = next(d for d in (json.loads(line)["text"] for line in f) if len(d) >= 2000)[:2000]
    _, offsets = encode(tok, doc)
    align_words(doc, offsets)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        align_words(doc, offsets)
    per_doc = (time.perf_counter() - start) / 5
    assert per_doc < 0.05  # ~8 ms here; reloading the tagger per call would cost > 100 ms


# ---------------------------------------------------------------------------------- tagger data


def test_env_variables_come_first_in_order(tmp_path, monkeypatch):
    first, second = fake_data_dir(tmp_path / "a"), fake_data_dir(tmp_path / "b")
    monkeypatch.setenv("FLOWRAY_NLTK_DATA", str(first))
    monkeypatch.setenv("NLTK_DATA", str(second))
    assert find_nltk_data() == str(first)
    monkeypatch.delenv("FLOWRAY_NLTK_DATA")
    assert find_nltk_data() == str(second)


def test_an_incomplete_directory_is_skipped(tmp_path, monkeypatch):
    partial = fake_data_dir(tmp_path / "partial")
    (partial / FILES[-1]).unlink()  # no universal tagset mapping
    monkeypatch.setenv("FLOWRAY_NLTK_DATA", str(partial))
    assert find_nltk_data() != str(partial)


def test_shared_data_is_found_by_walking_up(tmp_path, monkeypatch):
    """A checkout beside a shared/ folder (any names) finds shared/data/nltk_data from a folder inside it."""
    import nltk

    monkeypatch.delenv("FLOWRAY_NLTK_DATA", raising=False)
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setattr(nltk.data, "path", [])
    shared = fake_data_dir(tmp_path / "project" / "shared" / "data" / "nltk_data")
    deep = tmp_path / "project" / "any-checkout-name" / "analysis"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_nltk_data() == str(shared)


def test_missing_data_raises_with_where_it_looked_and_the_fix(tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    monkeypatch.setattr(ftext, "_candidate_dirs", lambda: [nowhere])
    monkeypatch.setattr(ftext, "PACKAGED_TAGGER", tmp_path / "not-installed")  # a build without package data
    assert find_nltk_data() is None
    with pytest.raises(MissingDependencyError, match="FLOWRAY_NLTK_DATA") as info:
        universal_tagger()
    assert str(nowhere) in str(info.value) and "NLTK_DATA" in str(info.value)
    with pytest.raises(MissingDependencyError):
        align_words("The cat", [(0, 3), (3, 7)])
    # other languages need no tagger at all
    assert align_words("Le chat", [(0, 2), (2, 7)], language="fr").pos == [None, None]


# ------------------------------------------------------------------------- tagger shipped in the package


def test_the_packaged_tagger_is_used_when_no_nltk_data_is_found(tmp_path, monkeypatch):
    """A fresh machine: no shared/data, no nltk.download, no NLTK_DATA; POS tags still come out."""
    monkeypatch.setattr(ftext, "_candidate_dirs", lambda: [tmp_path / "nowhere"])
    assert find_nltk_data() is None
    tagger = universal_tagger()
    assert tagger.directory == str(ftext.PACKAGED_TAGGER)
    words = ["The", "cat", "sat", "on", "the", "mat", "."]
    assert tagger(words) == ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN", "."]
    offsets = [(0, 3), (3, 7), (7, 11), (11, 14), (14, 18), (18, 22), (22, 23)]
    assert align_words("The cat sat on the mat.", offsets).pos == ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN", "."]


def test_the_packaged_files_are_the_nltk_files_small_and_documented():
    import hashlib
    import lzma

    notice = (ftext.PACKAGED_TAGGER / "NOTICE.md").read_text()
    assert "MIT" in notice and "CC-BY-SA-4.0" in notice and "Provenance" in notice
    committed = sum(p.stat().st_size for p in ftext.PACKAGED_TAGGER.iterdir())
    assert committed < 1_200_000, f"the shipped tagger data grew to {committed} bytes; keep it xz-compressed"
    uncompressed = 0
    for path in sorted(ftext.PACKAGED_TAGGER.iterdir()):
        if path.suffix not in (".xz", ".map"):
            continue
        data = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
        uncompressed += len(data)
        assert hashlib.sha256(data).hexdigest() in notice, f"{path.name}: its checksum is not the one NOTICE.md gives"
    assert 5_000_000 < uncompressed < 6_500_000


@needs_shared_nltk
def test_the_packaged_tagger_tags_like_the_shared_nltk_data():
    packaged = ftext.UniversalTagger(str(ftext.PACKAGED_TAGGER))
    shared = ftext.UniversalTagger(str(NLTK_DATA))
    with open(SHARED_DATA / "c4_sample" / "c4_en_sample_1000.jsonl") as f:
        words = words_of(json.loads(next(f))["text"])
    assert packaged(words) == shared(words)


# ------------------------------------------------------------------------------ texts cut to max_tokens

CUT_TEXTS = [
    "The quick brown fox jumps over the lazy dog; the farmer, unimpressed, didn't look up from 2024's paper. " * 3,
    "def f(x):\n        return  x  +  1   # indented, runs of spaces\n\n\n" * 4,
    "Привет мир, как дела? Всё хорошо. " * 4,
    "nospacesatallinthislongwordthatgoesonandon" * 3,
    "  leading spaces,\ttabs\tand trailing ones   ",
    # long words: a prefix cut inside a word would end in a piece of it
    " environmental particularly understanding government organization significantly international" * 3,
]


def test_a_cut_text_is_encoded_from_a_prefix_into_the_whole_texts_first_tokens(tok):
    for text in CUT_TEXTS:
        full = ftext.encode_kept(tok, text)
        for need in range(1, len(full[0]) + 2):
            assert ftext.encode_kept(tok, text, need) == (full[0][:need], full[1][:need]), (text[:20], need)
    seen = []

    def recording(text, **kw):
        seen.append(len(text))
        return tok(text, **kw)

    long_text = CUT_TEXTS[0] * 30
    ids, offsets = ftext.encode_kept(recording, long_text, 20)
    assert len(ids) == len(offsets) == 20 and max(seen) < len(long_text) / 20


def test_a_tagger_that_reads_two_words_ahead_is_given_the_kept_words_and_two_more():
    text = " ".join(f"w{i}" for i in range(40))
    tagger = Recorder()
    tagger.lookahead = 2
    offsets = [(0, 2), (2, 5), (5, 8)]  # "w0", " w1", " w2": the tokens kept of a long text
    tw = align_words(text, offsets, tagger=tagger)
    assert tagger.calls == [["w0", "w1", "w2", "w3", "w4"]] and tw.pos == ["L2", "L2", "L2"]
    everything = Recorder()  # a tagger that does not say how far it reads sees every word
    align_words(text, offsets, tagger=everything)
    assert len(everything.calls[0]) == 40


def test_the_universal_tagger_tags_a_cut_text_as_nltk_tags_the_whole_text(tok):
    """Its tags equal nltk's PerceptronTagger.tag (the same features, numpy sums) and need only the
    kept words and two more."""
    import pydoc_data.topics

    tagger = universal_tagger()
    for name in ("assignment", "calls", "for", "if"):
        text = pydoc_data.topics.topics[name][:3000]
        words = words_of(text)
        nltk_tags = [t for _, t in tagger._tagger.tag(words)]
        assert tagger._treebank(words) == nltk_tags
        _, offsets = encode(tok, text)
        universal = [tagger._to_universal.get(t, "X") for t in nltk_tags]
        for keep in range(1, 120):
            cut = align_words(text, offsets[:keep])
            whole = align_words(text, offsets[:keep], tagger=lambda w: universal)  # every word, tagged by nltk
            assert cut.pos == whole.pos, (name, keep)


def test_the_dense_scores_pick_the_tag_nltk_picks_ties_included():
    from nltk.tag.perceptron import AveragedPerceptron

    model = AveragedPerceptron()
    model.weights = {"a": {"X": 1.0, "Y": 1.0}, "b": {"Z": 0.5, "X": -0.25}, "c": {}}
    model.classes = {"W", "X", "Y", "Z"}
    scores = ftext._DenseScores(model)
    for features in ({"a": 1}, {"b": 1}, {"c": 1}, {"unknown": 1}, {"a": 1, "b": 1}, {"b": 1, "a": 1}, {"a": 2}):
        assert scores.predict(features) == model.predict(features)[0], features
