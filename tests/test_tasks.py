"""flowray.tasks: well-formed single-answer prompts, contrastive twins, determinism, helpful errors."""

from __future__ import annotations

import re

import pytest

from flowray import tasks
from flowray.errors import InputError
from flowray.tasks import TASKS, TaskPrompt, arithmetic_prompts, greater_than_prompts, ioi_prompts, task_prompts

N = 60
GT_PATTERN = re.compile(r"^The (\w+) lasted from the year (\d\d)(\d\d) to the year (\d\d)$")


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def count_words(text: str, word: str) -> int:
    """Whole-word occurrences ("Sara" does not count inside "Sarah")."""
    return len(re.findall(rf"\b{re.escape(word)}\b", text))


class FakeGPT2Tokenizer:
    """GPT-2-like splits without a download: words keep their leading space, numbers come in 2-digit pieces."""

    PIECE = re.compile(r" ?[A-Za-z]+| ?\d{1,2}| ?[^\sA-Za-z\d]| +")

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in self.PIECE.findall(text)]}

    def decode(self, token_ids):
        pieces = {i: p for p, i in self.vocab.items()}
        return "".join(pieces[i] for i in token_ids)


class CharTokenizer(FakeGPT2Tokenizer):
    """One token per character: no name or noun is a single token."""

    PIECE = re.compile(r".", re.S)


# ------------------------------------------------------------------------------ every task, SmolLM2


@pytest.mark.parametrize("task", TASKS)
def test_answer_and_wrong_are_single_next_tokens_with_smollm2(task, tok):
    prompts = task_prompts(task, N, seed=3, tokenizer=tok)
    assert len(prompts) == N and all(isinstance(p, TaskPrompt) and p.task == task for p in prompts)
    for p in prompts:
        head = ids(tok, p.text)
        for piece, key in ((p.answer, "answer_token_id"), (p.wrong, "wrong_token_id")):
            full = ids(tok, p.text + piece)
            assert full[: len(head)] == head and len(full) == len(head) + 1, (p, piece)
            assert full[-1] == p.meta[key]
            # SmolLM2 (byte-level BPE, no prefix space) encodes the piece alone as the same token
            assert ids(tok, piece) == [p.meta[key]]
        assert p.answer != p.wrong


@pytest.mark.parametrize("task", TASKS)
def test_contrastive_twin_has_the_same_token_length(task, tok):
    for p in task_prompts(task, N, seed=5, tokenizer=tok):
        assert p.contrastive != p.text
        assert len(ids(tok, p.contrastive)) == len(ids(tok, p.text)), p


@pytest.mark.parametrize("task", TASKS)
def test_prompts_are_distinct_deterministic_and_prefix_stable(task):
    first = task_prompts(task, 40, seed=11)
    assert len({p.text for p in first}) == 40
    assert task_prompts(task, 40, seed=11) == first
    assert task_prompts(task, 15, seed=11) == first[:15]
    assert [p.text for p in task_prompts(task, 40, seed=12)] != [p.text for p in first]


# ------------------------------------------------------------------------------------------- IOI


def test_ioi_names_answer_once_subject_twice_and_abc_twin(tok):
    prompts = ioi_prompts(N, seed=1, tokenizer=tok)
    for p in prompts:
        io, s, c = p.meta["io"], p.meta["s"], p.meta["c"]
        assert len({io, s, c}) == 3
        assert (p.answer, p.wrong) == (" " + io, " " + s)
        assert count_words(p.text, io) == 1 and count_words(p.text, s) == 2 and count_words(p.text, c) == 0
        # the twin keeps the first subject and swaps the second one for C
        assert [count_words(p.contrastive, name) for name in (io, s, c)] == [1, 1, 1]
        assert p.contrastive.index(s) == p.text.index(s)
        assert p.text[p.text.rindex(s):].replace(s, c, 1) == p.contrastive[p.text.rindex(s):]
        assert len(ids(tok, " " + io)) == 1 and len(ids(tok, " " + c)) == 1
        # ABBA: the answer is named first; BABA: the subject is
        first_is_io = p.text.index(io) < p.text.index(s)
        assert first_is_io == (p.meta["family"] == "ABBA")
        assert p.template == f"{p.meta['family']}-{p.meta['template_index']}"
        assert p.text.endswith(" to")  # every template ends "... to [A]"


def test_ioi_template_sets():
    both = ioi_prompts(10, seed=0)
    assert [p.meta["family"] for p in both] == ["ABBA", "BABA"] * 5
    assert {p.meta["family"] for p in ioi_prompts(10, seed=0, templates="BABA")} == {"BABA"}
    assert {p.meta["family"] for p in ioi_prompts(10, seed=0, templates="ABBA")} == {"ABBA"}
    used = {p.template for p in ioi_prompts(300, seed=0)}
    assert len(used) == 30  # all 15 ABBA and 15 BABA templates occur


def test_ioi_names_are_filtered_to_single_tokens(tok):
    multi = [n for n in tasks._data("ioi")["names"] if len(ids(tok, " " + n)) > 1]
    assert "Brittany" in multi  # SmolLM2 splits some of Wang et al.'s GPT-2 names
    used = {p.meta[k] for p in ioi_prompts(200, seed=0, tokenizer=tok) for k in ("io", "s", "c")}
    assert used and not used & set(multi)


# ---------------------------------------------------------------------------------- greater-than


@pytest.mark.parametrize("contrastive_yy", ["01", "00"])
def test_greater_than_digits_obey_the_rule(contrastive_yy, tok):
    valid_years = set(tasks._data("greater_than")["years"])
    for p in greater_than_prompts(N, seed=2, tokenizer=tok, contrastive_yy=contrastive_yy):
        noun, xx, yy, xx_end = GT_PATTERN.match(p.text).groups()
        assert xx == xx_end and int(xx + yy) == p.meta["start_year"] and int(xx + yy) in valid_years
        assert p.contrastive == p.text.replace(f"year {xx}{yy} ", f"year {xx}{contrastive_yy} ")
        tens = int(yy[0])
        assert 1 <= tens <= 8 and p.meta["mode"] == "digit"
        assert (p.answer, p.wrong) == (str(tens + 1), str(tens - 1))
        start = int(xx + yy)
        # correct tens digits beat the start year with any ones digit, incorrect ones never do
        assert all(int(f"{xx}{d}0") > start for d in p.meta["correct_next"])
        assert all(int(f"{xx}{d}9") < start for d in p.meta["incorrect_next"])
        assert p.meta["ambiguous_next"] == [yy[0]]
        classes = p.meta["correct_next"] + p.meta["incorrect_next"] + p.meta["ambiguous_next"]
        assert sorted(classes) == list("0123456789")
        assert p.meta["correct_tens_digits"] == [int(d) for d in p.meta["correct_next"]]
        # SmolLM2 writes years digit by digit: the prompt ends with the two century digits
        assert [tok.decode([i]) for i in ids(tok, p.text)[-2:]] == list(xx)


def test_greater_than_nouns_are_single_tokens(tok):
    nouns = {p.meta["noun"] for p in greater_than_prompts(300, seed=0, tokenizer=tok)}
    assert all(len(ids(tok, " " + n)) == 1 for n in nouns)
    assert "slump" not in nouns  # two SmolLM2 tokens


def test_greater_than_with_two_digit_year_tokens():
    fake = FakeGPT2Tokenizer()
    for p in greater_than_prompts(20, seed=0, tokenizer=fake):
        yy = int(p.meta["yy"])
        assert p.meta["mode"] == "pair"
        assert (p.answer, p.wrong) == (f"{yy + 1:02d}", f"{yy - 1:02d}")
        assert p.meta["correct_next"][0] == p.answer and p.meta["correct_next"][-1] == "99"
        assert p.meta["incorrect_next"][-1] == p.meta["yy"]  # "not greater" includes YY itself
        assert len(fake(p.text + p.answer)["input_ids"]) == len(fake(p.text)["input_ids"]) + 1


# ------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize("op", ["addition", "subtraction"])
def test_arithmetic_operands_results_and_first_digit_answer(op, tok):
    sign = {"addition": 1, "subtraction": -1}[op]
    for p in arithmetic_prompts(N, op, seed=4, tokenizer=tok):
        m = p.meta
        assert [int(v) for v in re.findall(r"\d+", p.text)] == [m["x"], m["y"]]
        assert [int(v) for v in re.findall(r"\d+", p.contrastive)] == [m["contrastive_x"], m["contrastive_y"]]
        assert m["result"] == m["x"] + sign * m["y"] and 1 <= m["result"] <= 299
        assert m["contrastive_result"] == m["contrastive_x"] + sign * m["contrastive_y"]
        assert 1 <= m["contrastive_result"] <= 299
        assert len(str(m["x"])) == len(str(m["contrastive_x"])) and len(str(m["y"])) == len(str(m["contrastive_y"]))
        assert len(str(m["result"])) == len(str(m["contrastive_result"]))
        # SmolLM2 writes " 15" as " " "1" "5": the space is part of the prompt, the answer is the first digit
        assert p.text.endswith(" ") and m["completion"] == str(m["result"])
        assert (p.answer, p.wrong) == (str(m["result"])[0], str(m["contrastive_result"])[0])
        assert ids(tok, p.text + m["completion"]) == ids(tok, p.text) + ids(tok, m["completion"])
        assert p.template == f"{op[:3]}-{m['template_index']}"


def test_arithmetic_with_number_tokens_keeps_the_space_in_the_answer():
    fake = FakeGPT2Tokenizer()
    for p in arithmetic_prompts(20, "addition", seed=0, tokenizer=fake):
        assert not p.text.endswith(" ")
        assert p.answer.startswith(" ") and p.meta["completion"] == f" {p.meta['result']}"
        assert p.meta["completion"].startswith(p.answer)


def test_arithmetic_without_tokenizer_uses_the_digit_convention():
    templates = tasks._data("arithmetic")["templates"]["subtraction"]
    for p in arithmetic_prompts(30, "subtraction", seed=0):
        assert p.text == templates[p.meta["template_index"]].format(x=p.meta["x"], y=p.meta["y"]) + " "
        assert p.answer == str(p.meta["result"])[0]
        assert "answer_token_id" not in p.meta


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("n", [-1, 2.5, True, "10"])
def test_bad_n_is_an_input_error(n):
    expected = rf"n \(the number of ioi prompts\) must be an integer >= 0; got {re.escape(repr(n))}"
    with pytest.raises(InputError, match=expected):
        task_prompts("ioi", n)


def test_zero_prompts_is_fine():
    assert task_prompts("greater_than", 0) == []


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: task_prompts("sentiment", 3),
         r"task must be one of \['ioi', 'greater_than', 'addition', 'subtraction'\]; got 'sentiment'"),
        (lambda: task_prompts("ioi", 3, contrastive_yy="00"),
         r"unknown option\(s\) \['contrastive_yy'\] for task 'ioi'; allowed: \['templates'\]"),
        (lambda: ioi_prompts(3, templates="ABC"), r"templates must be one of \['both', 'ABBA', 'BABA'\]; got 'ABC'"),
        (lambda: greater_than_prompts(3, contrastive_yy="02"),
         r"contrastive_yy must be one of \['01', '00'\]; got '02'"),
        (lambda: arithmetic_prompts(3, "multiplication"),
         r"op must be one of \['addition', 'subtraction'\]; got 'multiplication'"),
        (lambda: ioi_prompts(3, seed="a"), r"seed must be an integer; got 'a'"),
    ],
)
def test_bad_options_name_the_allowed_values(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_a_tokenizer_without_single_token_names_is_an_input_error():
    with pytest.raises(InputError, match="IOI needs 3 names that are one token"):
        ioi_prompts(3, tokenizer=CharTokenizer())
    with pytest.raises(InputError, match="nouns that are one token"):
        greater_than_prompts(3, tokenizer=CharTokenizer())


def test_more_prompts_than_distinct_examples_is_an_input_error(monkeypatch):
    tiny = {**tasks._data("greater_than"), "nouns": ["war"], "years": [1750, 1760]}
    monkeypatch.setattr(tasks, "_data", lambda name: tiny)
    assert len(greater_than_prompts(2, seed=0)) == 2
    with pytest.raises(InputError, match=r"could only generate 2 distinct greater_than prompts .* n=3"):
        greater_than_prompts(3, seed=0)


def test_packaged_data_cites_its_source_and_is_small():
    from importlib import resources

    for name in ("ioi", "greater_than", "arithmetic"):
        data = tasks._data(name)
        assert data["source"]["repository"] and data["source"]["copied_from"].startswith("shared/data/")
    total = sum(len((resources.files("flowray") / "data" / f"{n}.json").read_bytes())
                for n in ("ioi", "greater_than", "arithmetic"))
    assert total < 50_000
    templates = [t for ts in tasks._data("ioi")["templates"].values() for t in ts]
    assert len(templates) == 30 and all(t.endswith(" [A]") and t.count("[B]") == 2 for t in templates)
