"""Generated task prompts with contrastive twins: IOI, greater-than, addition and subtraction.

Each generator returns ``TaskPrompt`` records: a prompt whose next token is the prediction under study,
the correct next token (``answer``), the main wrong alternative (``wrong``) for logit differences
``logit(answer) - logit(wrong)``, and a contrastive twin prompt (the patching baseline of Section 3 of
Ferrando & Voita 2024). The ingredient lists ship in ``flowray/data/{ioi,greater_than,arithmetic}.json``.

Tasks
-----
IOI (Wang et al. 2023). ABBA / BABA templates, ``[A]`` = indirect object = ``answer`` (" Mary"),
``[B]`` = subject, repeated = ``wrong`` (" John"). Twin: the same template with the second occurrence of
the subject replaced by a third name C (the paper's "ABC" baseline), e.g.
``Then, John and Mary went to the store. Alice gave a drink to``.

Greater-than (Hanna et al. 2023). ``The {noun} lasted from the year {XX}{YY} to the year {XX}``; start
years come from the source's valid-year list (1000..1899), restricted to a YY tens digit in 1..8. Twin:
the same prompt with YY = "01" (Hanna et al.'s corrupted prompt, the default) or "00" (the paper's
alternative baseline, Section 3.2). The prediction depends on how the tokenizer writes numbers:

* digit tokenizers (SmolLM2, Llama; also assumed when no tokenizer is given): the prompt ends with the
  two century digits, so the next token is the *tens digit* t' of the end year. With t = YY // 10, a
  tens digit t' > t makes the end year later than the start year whatever the ones digit, t' = t only
  for some ones digits, and t' < t never. ``answer`` = str(t + 1), the smallest tens digit that is
  always correct; ``wrong`` = str(t - 1), the largest one that is always wrong. Both are the
  neighbours of t, so the logit difference compares the two closest digits on either side of the
  start year instead of rewarding a generic preference for large digits; keeping t in 1..8 makes both
  exist.
* two-digit year tokenizers (GPT-2: " 17" "32"): the next token is the whole YY' of the end year;
  ``answer`` = f"{YY+1:02d}", ``wrong`` = f"{YY-1:02d}" (same neighbour rule, one token per year part).

``meta`` has ``mode`` ("digit" | "pair"), ``correct_next`` (next tokens that are always correct),
``ambiguous_next`` (digit mode: [str(t)]) and ``incorrect_next`` (always wrong, YY itself included in
pair mode), so the probability difference of Hanna et al. can be computed too; in digit mode also
``correct_tens_digits`` (ints).

Addition / subtraction (Stolfo et al. 2023). Two-operand templates such as
``Q: How much is {x} plus {y}? A:``; x, y are uniform in 1..max_n (300) and resampled until the result
is in 1..max_n-1, as in the source. ``answer`` is the *first token* of the result as it follows the
prompt, ``meta["completion"]`` the whole result text. Tokenizers that write " 15" as " " "1" "5"
(SmolLM2, Llama) get the space moved into the prompt (``...A: ``) so that the prediction is the first
digit ("1"); this is also the convention without a tokenizer. Tokenizers with number tokens (GPT-2)
keep ``...A:`` and the answer " 15". Twin: the same template with new operands that have the same
numbers of digits as the originals and a result of the same width whose first digit differs; ``wrong``
is the twin's answer token (on the twin the roles of ``answer`` and ``wrong`` swap). Examples without
such a twin are drawn again, so a few operand combinations never occur (3-digit + 3-digit sums, all
2xx below 300; 3-digit minus 1-digit results 91..99): a small departure from the source's sampling.

Tokenizer checks
----------------
With a tokenizer (anything called as ``tokenizer(text, add_special_tokens=False)["input_ids"]`` with
a ``decode(ids)``) the generators keep only names / nouns that are one token after a space, and keep an
example only if ``answer`` and ``wrong`` are each exactly one token *as a continuation of the prompt*
(the prompt's tokens followed by one more token, which is what the model predicts) and the twin has
as many tokens as the original; otherwise they draw again. ``meta`` then also holds
``answer_token_id`` and ``wrong_token_id``: with sentencepiece tokenizers encoding " Mary" on its own
gives a different id than the continuation does, so use these ids rather than re-encoding.

Every generator is deterministic for a given (seed, tokenizer) and prefix-stable: the first k prompts
of n > k are the k prompts asked for alone. Prompts within one call are distinct.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from flowray.errors import InputError

TASKS: tuple[str, ...] = ("ioi", "greater_than", "addition", "subtraction")
IOI_TEMPLATE_SETS: tuple[str, ...] = ("both", "ABBA", "BABA")
CONTRASTIVE_YY: tuple[str, ...] = ("01", "00")
ARITHMETIC_OPS: tuple[str, ...] = ("addition", "subtraction")
# Keyword options each task accepts and their allowed values (flowray.corpora validates job configs with it).
TASK_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "ioi": {"templates": IOI_TEMPLATE_SETS},
    "greater_than": {"contrastive_yy": CONTRASTIVE_YY},
    "addition": {},
    "subtraction": {},
}

_OP_PREFIX = {"addition": "add", "subtraction": "sub"}
_WORD_PROBE = "The"  # context for "is this word one token after a space?"; any word works for BPE splits
_ATTEMPTS_PER_PROMPT = 50  # rejection-sampling budget; real rates: about 1 in 5 draws rejected (addition) or fewer


@dataclass(frozen=True)
class TaskPrompt:
    """One task example: a prompt, its correct and main wrong next token, and its contrastive twin."""

    task: str  # "ioi" | "greater_than" | "addition" | "subtraction"
    template: str  # template id, e.g. "BABA-3", "ABBA-0", "gt-0", "add-2"
    text: str  # the prompt; the prediction is the token right after its last token
    answer: str  # the correct next token's text, e.g. " Mary"
    wrong: str  # the main wrong alternative for logit differences
    contrastive: str  # the contrastive twin prompt
    meta: dict  # names / years / operands: whatever identifies the example (JSON-serialisable)


# ---------------------------------------------------------------------------------------------- data


@cache
def _data(name: str) -> dict:
    """The packaged ingredient file flowray/data/{name}.json."""
    with (resources.files("flowray") / "data" / f"{name}.json").open(encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------- tokenizer


class _Vocab:
    """Token checks against one tokenizer (the generators skip them when there is no tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def next_tokens(self, prompt: str, completion: str) -> list[int] | None:
        """Token ids ``completion`` adds after ``prompt``; None when the prompt's own tokens change."""
        head, full = self.ids(prompt), self.ids(prompt + completion)
        if full[: len(head)] != head:
            return None
        return full[len(head):]

    def single_next(self, prompt: str, piece: str) -> int | None:
        """The id of ``piece`` when it is exactly one token following ``prompt``, else None."""
        ids = self.next_tokens(prompt, piece)
        return ids[0] if ids is not None and len(ids) == 1 else None

    def one_token_words(self, words: list[str]) -> list[str]:
        """The words that are a single token after a space (" Mary")."""
        return [w for w in words if self.single_next(_WORD_PROBE, " " + w) is not None]

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


# ----------------------------------------------------------------------------------------- helpers


def _check_n(n, task: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n (the number of {task} prompts) must be an integer >= 0; got {n!r}")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer; got {seed!r}")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {list(allowed)}; got {value!r}")


def _generate(n: int, task: str, draw: Callable[[int], TaskPrompt | None]) -> list[TaskPrompt]:
    """Call ``draw(k)`` (k = prompts kept so far) until n distinct prompts are kept.

    ``draw`` returns None for an example that fails a tokenizer check; the bounded budget turns an
    impossible request (a tokenizer no example fits, or more prompts than distinct ones) into an error.
    """
    kept: list[TaskPrompt] = []
    seen: set[str] = set()
    for _ in range(_ATTEMPTS_PER_PROMPT * n + 100):
        if len(kept) == n:
            break
        prompt = draw(len(kept))
        if prompt is not None and prompt.text not in seen:
            seen.add(prompt.text)
            kept.append(prompt)
    if len(kept) < n:
        raise InputError(
            f"could only generate {len(kept)} distinct {task} prompts that pass the tokenizer checks; "
            f"asked for n={n!r}; ask for fewer prompts or check that the tokenizer writes names/numbers "
            f"as the module docstring of flowray.tasks describes"
        )
    return kept


def _word_span(text: str, word: str) -> list[int]:
    """[start, end) of the first occurrence of ``word`` as a whole word (the IOI indirect object)."""
    match = re.search(rf"\b{re.escape(word)}\b", text)
    return [match.start(), match.end()]


def _yy_span(text: str, year: str) -> list[int]:
    """[start, end) of the start year's last two digits (YY) in a greater-than prompt."""
    start = text.index(year) + len(year) - 2
    return [start, start + 2]


def _fill(template: str, **fields: str) -> str:
    for key, value in fields.items():
        template = template.replace(f"[{key}]", value)
    return template


# --------------------------------------------------------------------------------------------- IOI


def _ioi_bodies(template: str) -> tuple[str, str]:
    """(prompt template, ABC twin template): drop the final " [A]"; twin: second [B] becomes [C]."""
    body = template.removesuffix(" [A]")
    first = body.index("[B]")
    second = body.index("[B]", first + 1)
    return body, body[:second] + "[C]" + body[second + len("[B]"):]


def ioi_prompts(n: int, *, seed: int = 0, tokenizer=None, templates: str = "both") -> list[TaskPrompt]:
    """n IOI prompts (Wang et al. 2023) with ABC twins; ``templates``: "both" (alternating), "ABBA", "BABA"."""
    _check_n(n, "ioi")
    _check_seed(seed)
    _check_choice("templates", templates, IOI_TEMPLATE_SETS)
    data = _data("ioi")
    vocab = _Vocab(tokenizer) if tokenizer is not None else None
    names = vocab.one_token_words(data["names"]) if vocab else list(data["names"])
    if len(names) < 3:
        raise InputError(f"IOI needs 3 names that are one token after a space; this tokenizer has {names!r}")
    families = ("ABBA", "BABA") if templates == "both" else (templates,)
    rng = random.Random(seed)

    def draw(k: int) -> TaskPrompt | None:
        family = families[k % len(families)]
        index = rng.randrange(len(data["templates"][family]))
        a, b, c = rng.sample(names, 3)
        place, obj = rng.choice(data["places"]), rng.choice(data["objects"])
        body, twin_body = _ioi_bodies(data["templates"][family][index])
        fields = dict(A=a, B=b, C=c, PLACE=place, OBJECT=obj)
        text, twin = _fill(body, **fields), _fill(twin_body, **fields)
        meta = {"family": family, "template_index": index, "io": a, "s": b, "c": c, "place": place, "object": obj,
                "source_span": _word_span(text, a), "contrastive_source_span": _word_span(twin, a)}
        if vocab and not _token_checks(vocab, text, twin, " " + a, " " + b, meta):
            return None
        return TaskPrompt("ioi", f"{family}-{index}", text, " " + a, " " + b, twin, meta)

    return _generate(n, "ioi", draw)


def _token_checks(vocab: _Vocab, text: str, twin: str, answer: str, wrong: str, meta: dict) -> bool:
    """answer/wrong are distinct single next tokens and the twin is as long as the prompt; records the ids."""
    answer_id, wrong_id = vocab.single_next(text, answer), vocab.single_next(text, wrong)
    if answer_id is None or wrong_id is None or answer_id == wrong_id:
        return False
    if len(vocab.ids(text)) != len(vocab.ids(twin)):
        return False
    meta.update(answer_token_id=answer_id, wrong_token_id=wrong_id)
    return True


# ------------------------------------------------------------------------------------ greater-than


def _greater_than_targets(vocab: _Vocab | None, text: str, yy: int) -> dict | None:
    """answer / wrong / next-token classes for start-year suffix ``yy`` (see the module docstring)."""
    tens = yy // 10
    digit = {
        "mode": "digit",
        "answer": str(tens + 1),
        "wrong": str(tens - 1),
        "correct_next": [str(d) for d in range(tens + 1, 10)],
        "ambiguous_next": [str(tens)],
        "incorrect_next": [str(d) for d in range(tens)],
        "correct_tens_digits": list(range(tens + 1, 10)),
    }
    if vocab is None or (_splits_digits(vocab, text, digit["answer"]) and _splits_digits(vocab, text, digit["wrong"])):
        return digit
    pair = {
        "mode": "pair",
        "answer": f"{yy + 1:02d}",
        "wrong": f"{yy - 1:02d}",
        "correct_next": [f"{v:02d}" for v in range(yy + 1, 100)],
        "ambiguous_next": [],
        "incorrect_next": [f"{v:02d}" for v in range(yy + 1)],
    }
    if vocab.single_next(text, pair["answer"]) is not None and vocab.single_next(text, pair["wrong"]) is not None:
        return pair
    return None


def _splits_digits(vocab: _Vocab, text: str, tens_digit: str) -> bool:
    """Whether an end year's two digits after ``text`` are two tokens, the first being ``tens_digit``."""
    first = vocab.single_next(text, tens_digit)
    ids = vocab.next_tokens(text, tens_digit + "5")
    return first is not None and ids is not None and len(ids) == 2 and ids[0] == first


def greater_than_prompts(n: int, *, seed: int = 0, tokenizer=None, contrastive_yy: str = "01") -> list[TaskPrompt]:
    """n greater-than prompts (Hanna et al. 2023) with twins whose start year ends in ``contrastive_yy``."""
    _check_n(n, "greater_than")
    _check_seed(seed)
    _check_choice("contrastive_yy", contrastive_yy, CONTRASTIVE_YY)
    data = _data("greater_than")
    vocab = _Vocab(tokenizer) if tokenizer is not None else None
    nouns = vocab.one_token_words(data["nouns"]) if vocab else list(data["nouns"])
    if not nouns:
        raise InputError("greater-than needs nouns that are one token after a space; this tokenizer has none")
    # t = YY // 10 in 1..8, so both neighbours t-1 and t+1 (the wrong and the answer digit) exist.
    years = [y for y in data["years"] if 1 <= (y % 100) // 10 <= 8]
    rng = random.Random(seed)

    def draw(k: int) -> TaskPrompt | None:
        noun, year = rng.choice(nouns), rng.choice(years)
        century, yy = divmod(year, 100)
        text = data["template"].format(noun=noun, XX=century, YY=f"{yy:02d}")
        twin = data["template"].format(noun=noun, XX=century, YY=contrastive_yy)
        targets = _greater_than_targets(vocab, text, yy)
        if targets is None:
            return None
        answer, wrong = targets.pop("answer"), targets.pop("wrong")
        meta = {"noun": noun, "century": str(century), "yy": f"{yy:02d}", "start_year": year,
                "contrastive_yy": contrastive_yy, **targets,
                "source_span": _yy_span(text, f"{century}{yy:02d}"),
                "contrastive_source_span": _yy_span(twin, f"{century}{contrastive_yy}")}
        if vocab and not _token_checks(vocab, text, twin, answer, wrong, meta):
            return None
        return TaskPrompt("greater_than", "gt-0", text, answer, wrong, twin, meta)

    return _generate(n, "greater_than", draw)


# -------------------------------------------------------------------------------------- arithmetic


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "addition" else x - y


def _operands(rng: random.Random, op: str, max_n: int) -> tuple[int, int]:
    """x, y uniform in 1..max_n, resampled until the result is in 1..max_n-1 (the source's rule)."""
    while True:  # about half of the draws pass for both operations
        x, y = rng.randint(1, max_n), rng.randint(1, max_n)
        if 1 <= _apply(op, x, y) <= max_n - 1:
            return x, y


def _same_width(rng: random.Random, value: int, max_n: int) -> int:
    """A uniform number in 1..max_n with as many digits as ``value`` (keeps the twin's token count)."""
    width = len(str(value))
    return rng.randint(max(1, 10 ** (width - 1)), min(max_n, 10**width - 1))


def _twin_operands(rng: random.Random, op: str, max_n: int, x: int, y: int) -> tuple[int, int] | None:
    """Operands of the same widths as x, y whose valid result has the same width, another first digit.

    Same-width operands keep the twin's token count; a same-width result keeps the logit difference
    about the leading digit rather than about how many digits the result has.
    """
    result = str(_apply(op, x, y))
    for _ in range(_ATTEMPTS_PER_PROMPT):
        x2, y2 = _same_width(rng, x, max_n), _same_width(rng, y, max_n)
        twin = _apply(op, x2, y2)
        if 1 <= twin <= max_n - 1 and len(str(twin)) == len(result) and str(twin)[0] != result[0]:
            return x2, y2
    return None  # e.g. 3-digit + 3-digit sums are all 2xx: draw another example


def _split_answer(vocab: _Vocab | None, prompt: str, result: int) -> tuple[str, str, int | None] | None:
    """(prompt, answer, answer id): the result's first token after the prompt, whitespace moved into it.

    A tokenizer that writes " 15" as " " "1" "5" would otherwise make the next token a bare space,
    which says nothing about arithmetic; the space joins the prompt so the prediction is the digit.
    """
    if vocab is None:
        return prompt + " ", str(result)[0], None
    ids = vocab.next_tokens(prompt, f" {result}")
    if not ids:
        return None
    lead = vocab.decode(ids[0])
    if not lead.strip() and len(ids) > 1:
        prompt += lead
        ids = vocab.next_tokens(prompt, f" {result}".removeprefix(lead))
        if not ids:
            return None
    answer = vocab.decode(ids[0])
    if vocab.single_next(prompt, answer) != ids[0]:
        return None
    return prompt, answer, ids[0]


def arithmetic_prompts(n: int, op: str, *, seed: int = 0, tokenizer=None) -> list[TaskPrompt]:
    """n two-operand arithmetic prompts (Stolfo et al. 2023); ``op``: "addition" or "subtraction"."""
    _check_choice("op", op, ARITHMETIC_OPS)
    _check_n(n, op)
    _check_seed(seed)
    data = _data("arithmetic")
    templates, max_n = data["templates"][op], data["max_n"]
    vocab = _Vocab(tokenizer) if tokenizer is not None else None
    rng = random.Random(seed)

    def draw(k: int) -> TaskPrompt | None:
        index = rng.randrange(len(templates))
        x, y = _operands(rng, op, max_n)
        twin_xy = _twin_operands(rng, op, max_n, x, y)
        if twin_xy is None:
            return None
        x2, y2 = twin_xy
        original = _split_answer(vocab, templates[index].format(x=x, y=y), _apply(op, x, y))
        contrast = _split_answer(vocab, templates[index].format(x=x2, y=y2), _apply(op, x2, y2))
        if original is None or contrast is None:
            return None
        (text, answer, _), (twin, wrong, _) = original, contrast
        result = _apply(op, x, y)
        moved = text[len(templates[index].format(x=x, y=y)):]  # whitespace _split_answer moved into the prompt
        meta = {"op": op, "template_index": index, "x": x, "y": y, "result": result,
                "completion": f" {result}".removeprefix(moved),
                "contrastive_completion": f" {_apply(op, x2, y2)}".removeprefix(moved),
                "contrastive_x": x2, "contrastive_y": y2, "contrastive_result": _apply(op, x2, y2)}
        if vocab and not _token_checks(vocab, text, twin, answer, wrong, meta):
            return None
        return TaskPrompt(op, f"{_OP_PREFIX[op]}-{index}", text, answer, wrong, twin, meta)

    return _generate(n, op, draw)


# -------------------------------------------------------------------------------------- dispatcher


def task_prompts(task: str, n: int, *, seed: int = 0, tokenizer=None, **options) -> list[TaskPrompt]:
    """n prompts of ``task`` (one of TASKS); ``options`` are that task's keyword options (TASK_OPTIONS)."""
    _check_choice("task", task, TASKS)
    unknown = sorted(set(options) - set(TASK_OPTIONS[task]))
    if unknown:
        raise InputError(
            f"unknown option(s) {unknown} for task {task!r}; allowed: {sorted(TASK_OPTIONS[task])}; "
            f"got {options!r}"
        )
    if task == "ioi":
        return ioi_prompts(n, seed=seed, tokenizer=tokenizer, **options)
    if task == "greater_than":
        return greater_than_prompts(n, seed=seed, tokenizer=tokenizer, **options)
    return arithmetic_prompts(n, task, seed=seed, tokenizer=tokenizer)

