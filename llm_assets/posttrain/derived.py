"""Post-training examples derived from the corpus: a question about each docstring's object.

A docstring document of the corpus becomes the question what its object does, answered with the
docstring's first paragraph(s). Everything is a pure function of the input: the phrasing is picked
by the sha256 of the id, the wrong answers of preference pairs by a seeded sha256 order, never by
Python's ``hash()`` (salted per process) or by input order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from llm_assets.manifest import RejectedFrom
from llm_assets.posttrain.dataset_schema import PREFERENCE_COLUMNS, SFT_COLUMNS, DataSetError
from llm_assets.prompts import render_prompt

_MODULE_QUESTIONS = (
    "What is the module `{name}` for?",
    "What does the Python module `{name}` provide?",
    "Describe the purpose of the module `{name}`.",
    "Explain briefly what `{name}` is for.",
)
_OBJECT_QUESTIONS = (
    "What does `{name}` do?",
    "Explain what `{name}` does.",
    "Describe the purpose of `{name}`.",
    "What is `{name}` for?",
)
# Where a docstring stops being prose: doctests, reST fields, Google/NumPy section headings.
_SECTION = re.compile(
    r"^(>>>|:\w|\.\. |(Args|Arguments|Parameters|Returns?|Raises|Yields|Examples?|Notes?|Attributes|See Also)\s*:?\s*$)"
)
_UNDERLINE = re.compile(r"^\s*[-=~^]{3,}\s*$", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_NOT_SENTENCE_END = ("e.g.", "i.e.", "cf.", "vs.")


def sha256_int(text: str) -> int:
    """A deterministic integer of ``text``: the hash behind every seeded choice of the data sets."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def dotted_name(doc_id: str) -> tuple[str, bool] | None:
    """(dotted name, is a module) of a docstring document's id ``<source>:<path>.py::<qualname>``;
    None for an id of another shape."""
    location, sep, qualname = doc_id.rpartition("::")
    _, colon, relpath = location.partition(":")
    if not sep or not colon or not relpath.endswith(".py") or not qualname:
        return None
    parts = relpath.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(parts):
        return None
    module = ".".join(parts)
    return (module, True) if qualname == "<module>" else (f"{module}.{qualname}", False)


def question_for(doc_id: str) -> str | None:
    """The question a docstring answers; its phrasing is a pure function of the id, so the model
    sees several phrasings across the corpus rather than memorising one template."""
    named = dotted_name(doc_id)
    if named is None:
        return None
    name, is_module = named
    phrasings = _MODULE_QUESTIONS if is_module else _OBJECT_QUESTIONS
    return phrasings[sha256_int(doc_id) % len(phrasings)].format(name=name)


def _cut_at_sentence(paragraph: str, max_chars: int) -> str:
    best = 0
    for match in _SENTENCE_END.finditer(paragraph):
        end = match.end()
        if end > max_chars:
            break
        if not paragraph[:end].endswith(_NOT_SENTENCE_END):
            best = end
    if best:
        return paragraph[:best]
    # One sentence longer than the limit: cut between words and say so, rather than drop it.
    space = paragraph.rfind(" ", 0, max_chars)
    return (paragraph[:space] if space > 0 else paragraph[: max_chars - 1]).rstrip() + "…"


def answer_from_docstring(docstring: str, max_chars: int) -> str:
    """The docstring's leading prose paragraphs, whitespace collapsed, at most ``max_chars``.

    Whole paragraphs are taken while they fit; a first paragraph that is too long is cut at its
    last sentence end within the limit. Doctests and section headings end the prose.
    """
    answer = ""
    for paragraph in re.split(r"\n\s*\n", docstring.strip()):
        first_line = paragraph.strip().partition("\n")[0]
        if _SECTION.match(first_line) or _UNDERLINE.search(paragraph):
            break
        text = " ".join(paragraph.split())
        if not text:
            continue
        joined = f"{answer}\n\n{text}" if answer else text
        if len(joined) <= max_chars:
            answer = joined
            continue
        if not answer:
            answer = _cut_at_sentence(text, max_chars)
        break
    return answer


def docstring_rows(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """The docstring documents of the frames, unique by id, in id order (not input order)."""
    parts = []
    for frame in frames:
        missing = {"id", "text", "source", "kind"} - set(frame.columns)
        if missing:
            raise DataSetError(
                f"a corpus split frame lacks the columns {sorted(missing)}; pass dataset_splits' parquet files "
                "(columns id, text, source, uri, kind, sha256)"
            )
        parts.append(frame.filter(pl.col("kind") == "docstring").select("id", "text", "source", "kind"))
    if not parts:
        return pl.DataFrame(schema=dict.fromkeys(("id", "text", "source", "kind"), pl.String))
    # Sorted before choosing among repeated ids, so the choice does not depend on the input order.
    return pl.concat(parts).sort("id", "text").unique("id", keep="first", maintain_order=True)


@dataclass
class _Derived:
    ids: list[str]
    sources: list[str]
    prompts: list[str]
    answers: list[str]


def _derive(frame: pl.DataFrame, max_answer_chars: int) -> _Derived:
    """Question and answer of every docstring that has a parsable id and some prose."""
    out = _Derived([], [], [], [])
    for doc_id, text, source, _ in docstring_rows([frame]).iter_rows():
        question = question_for(doc_id)
        answer = answer_from_docstring(text, max_answer_chars) if question else ""
        if answer:
            out.ids.append(doc_id)
            out.sources.append(f"corpus:{source}")
            out.prompts.append(render_prompt([{"role": "user", "content": question}]))
            out.answers.append(answer)
    return out


def derive_sft_examples(frame: pl.DataFrame, max_answer_chars: int) -> pl.DataFrame:
    """SFT rows from the frame's ``kind == "docstring"`` documents, in id order."""
    d = _derive(frame, max_answer_chars)
    return pl.DataFrame(
        {"id": d.ids, "source": d.sources, "prompt": d.prompts, "completion": d.answers},
        schema=dict.fromkeys(SFT_COLUMNS, pl.String),
    )


def derive_preference_pairs(frame: pl.DataFrame, max_answer_chars: int, seed: int,
                            rejected_from: RejectedFrom = "hard_negatives") -> pl.DataFrame:
    """Preference rows from the frame's docstrings: chosen is the object's own answer; rejected is a
    hard negative, fluent and on-topic but wrong, so that telling them apart takes knowing the answer:

    - ``"sibling_object"``: the answer of another object of the same module (same class first),
      of a length comparable to the chosen one's (within :data:`MAX_LENGTH_RATIO`);
    - ``"perturbed_fact"``: the chosen answer with one fact changed (:func:`perturbed_fact`);
    - ``"hard_negatives"``: either, half and half by a seeded hash of the id, the other kind where
      the first has none.

    Every choice is a seeded sha256 of ids, so the pairs depend on the seed but not on the input
    order. An object with no negative of its kind is left out.
    """
    d = _derive(frame, max_answer_chars)
    modules: dict[str, list[int]] = {}
    for i, doc_id in enumerate(d.ids):
        modules.setdefault(_module_of(doc_id), []).append(i)
    identifiers = {
        module: _identifier_pool([d.ids[i] for i in members], [d.answers[i] for i in members])
        for module, members in modules.items()
    }
    rejected: dict[int, str] = {}
    for i, doc_id in enumerate(d.ids):
        module, key = _module_of(doc_id), f"{seed}\x00{doc_id}"
        if rejected_from != "hard_negatives":
            kinds = [rejected_from]
        elif sha256_int(f"{key}\x00kind") % 2:
            kinds = ["sibling_object", "perturbed_fact"]
        else:
            kinds = ["perturbed_fact", "sibling_object"]
        for kind in kinds:
            negative = (
                _sibling_answer(d, i, modules[module], key) if kind == "sibling_object"
                else perturbed_fact(d.answers[i], identifiers[module], key)
            )
            if negative is not None and _comparable_lengths(negative, d.answers[i]):
                rejected[i] = negative
                break
    kept = sorted(rejected)
    return pl.DataFrame(
        {
            "id": [d.ids[i] for i in kept], "source": [d.sources[i] for i in kept],
            "prompt": [d.prompts[i] for i in kept], "chosen": [d.answers[i] for i in kept],
            "rejected": [rejected[i] for i in kept],
        },
        schema=dict.fromkeys(PREFERENCE_COLUMNS, pl.String),
    )


# A longer (or shorter) rejected answer would let a reward model rank by length alone; a sibling
# at most this many times longer than the other keeps the lengths of a pair comparable.
MAX_LENGTH_RATIO = 1.5


def _module_of(doc_id: str) -> str:
    """``<source>:<path>.py`` of a docstring id: its module, the topic its siblings share."""
    return doc_id.rpartition("::")[0]


def _owner_of(doc_id: str) -> str:
    """The class (or module) an object is defined in: ``Thing`` of ``…::Thing.run``."""
    return doc_id.rpartition(".")[0] if "." in doc_id.rpartition("::")[2] else _module_of(doc_id)


def _comparable_lengths(a: str, b: str) -> bool:
    return max(len(a), len(b)) <= MAX_LENGTH_RATIO * min(len(a), len(b))


def _sibling_answer(d: _Derived, i: int, module: list[int], key: str) -> str | None:
    """The answer of another object of ``i``'s module with a different text of comparable length:
    one of the same class if there is one, else any, picked by a seeded hash."""
    candidates = [
        j for j in module if d.answers[j] != d.answers[i] and _comparable_lengths(d.answers[i], d.answers[j])
    ]
    if not candidates:
        return None
    owner = _owner_of(d.ids[i])
    best = min(candidates, key=lambda j: (_owner_of(d.ids[j]) != owner, sha256_int(f"{key}\x00{d.ids[j]}")))
    return d.answers[best]


# Opposites: swapping one for the other keeps the sentence fluent and reverses its fact.
_OPPOSITES = dict(
    pair for a, b in (
        ("true", "false"), ("always", "never"), ("first", "last"), ("before", "after"),
        ("minimum", "maximum"), ("smallest", "largest"), ("smaller", "larger"), ("less", "more"),
        ("lower", "upper"), ("input", "output"), ("read", "write"), ("reading", "writing"),
        ("start", "end"), ("add", "remove"), ("added", "removed"), ("open", "close"), ("opened", "closed"),
        ("enable", "disable"), ("enabled", "disabled"), ("synchronous", "asynchronous"),
        ("absolute", "relative"), ("local", "remote"), ("left", "right"), ("send", "receive"),
        ("sent", "received"), ("inclusive", "exclusive"), ("success", "failure"), ("with", "without"),
        ("including", "excluding"),
    ) for pair in ((a, b), (b, a))
)
# Negations are removed, never added: docstrings state far more than they deny, so an added "not"
# would mark the rejected answer (on the stdlib corpus, a third of all perturbations added one).
_OPPOSITES.update({
    "is not": "is", "are not": "are", "does not": "does", "do not": "do", "cannot": "can", "can not": "can",
    "must not": "must", "should not": "should", "will not": "will",
})
# Longest first, so "is not" is one site rather than "is" followed by "not"; no apostrophe or word
# character around it, so "doesn't" is no "does".
_OPPOSITE = re.compile(
    r"(?<![\w'])(" + "|".join(re.escape(w) for w in sorted(_OPPOSITES, key=len, reverse=True)) + r")(?![\w'])",
    re.IGNORECASE,
)
# A whole number, not part of a version, a decimal or a name ("3.11", "0.5", "x1").
_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w.])")
_WORD = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?![\w])")
# Code in prose: a name with an underscore, an inner capital (LogRecord, TypeError) or a call.
_CODE_NAME = re.compile(r"(?<![\w.])([A-Za-z_]\w*_\w*|[A-Za-z]+[a-z][A-Z]\w*|[A-Za-z_]\w*(?=\())")


def _identifier_pool(ids: list[str], answers: list[str]) -> tuple[str, ...]:
    """The names a module's docstrings talk about: its objects' names and the code names of its
    answers, sorted (a perturbation swaps one for another of the same module)."""
    names = {doc_id.rpartition("::")[2].rpartition(".")[2] for doc_id in ids} - {"<module>"}
    for answer in answers:
        names.update(match.group(1) for match in _CODE_NAME.finditer(answer))
    return tuple(sorted(names))


def perturbed_fact(answer: str, identifiers: tuple[str, ...], key: str) -> str | None:
    """``answer`` with one fact changed, the site and the new value picked by a hash of ``key``: a
    whole number moved by one, a word swapped for its opposite or a negation added or removed
    (``_OPPOSITES``), or a name of ``identifiers`` swapped for another one of the same case. None
    when the answer has no such site."""
    known = set(identifiers)
    sites: list[tuple[int, int, list[str]]] = []
    for match in _NUMBER.finditer(answer):
        n = int(match.group())
        sites.append((match.start(), match.end(), [str(n + 1)] + ([str(n - 1)] if n > 0 else [])))
    for match in _OPPOSITE.finditer(answer):
        word = match.group()
        opposite = _OPPOSITES[word.lower()]
        around = f"{answer[max(0, match.start() - 20):match.start()]} {answer[match.end():match.end() + 20]}"
        if re.search(rf"\b{re.escape(opposite)}\b", around, re.IGNORECASE):
            continue  # "read and write" would become "read and read": broken, not wrong
        if word[0].isupper():
            opposite = opposite[0].upper() + opposite[1:]
        sites.append((match.start(), match.end(), [opposite]))
    for match in _WORD.finditer(answer):
        name = match.group()
        if name in known and not _OPPOSITE.fullmatch(name):
            others = [other for other in identifiers if other != name and other[0].isupper() == name[0].isupper()]
            if others:
                sites.append((match.start(), match.end(), others))
    if not sites:
        return None
    # Most sites lengthen the answer ("is" → "is not" is the commonest); a coin says whether this
    # one should, so that a longer answer is not a sign of the rejected one.
    lengthen = sha256_int(f"{key}\x00lengthen") % 2 == 1
    sites = [site for site in sites if (len(site[2][0]) > site[1] - site[0]) == lengthen] or sites
    start, end, replacements = sites[sha256_int(f"{key}\x00site") % len(sites)]
    replacement = replacements[sha256_int(f"{key}\x00value") % len(replacements)]
    return answer[:start] + replacement + answer[end:]
