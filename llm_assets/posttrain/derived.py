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

import numpy as np
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
                            rejected_from: RejectedFrom = "shuffled_words") -> pl.DataFrame:
    """Preference rows from the frame's docstrings: chosen is the object's own answer; rejected is
    that answer with its words shuffled (``"shuffled_words"``: fluent, on-topic text over word
    salad, which a tiny reward model can learn) or the answer of another object of the same frame
    (``"other_object"``: which answer belongs to the question, a relational task for larger
    models).

    Shuffles are seeded by ``seed`` and the id. For other objects, the objects are put in the
    order of the sha256 of ``seed`` and id, and each one is paired with the answer of the next one
    in that order with a different text (the order wraps around): a derangement that depends on
    the seed but not on the input order. An object with no different rejected answer is left out.
    """
    d = _derive(frame, max_answer_chars)
    if rejected_from == "shuffled_words":
        rejected = {i: r for i in range(len(d.ids)) if (r := _shuffled_words(d.answers[i], f"{seed}\x00{d.ids[i]}"))}
    else:
        order = sorted(range(len(d.ids)), key=lambda i: (sha256_int(f"{seed}\x00{d.ids[i]}"), d.ids[i]))
        rejected = {}
        for position, i in enumerate(order):
            for step in range(1, len(order)):
                other = order[(position + step) % len(order)]
                if d.answers[other] != d.answers[i]:
                    rejected[i] = d.answers[other]
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


def _shuffled_words(answer: str, key: str) -> str | None:
    """The answer's words in a seeded random order; None if no order differs from the answer."""
    words = answer.split()
    for attempt in range(4):
        rng = np.random.default_rng(sha256_int(f"{key}\x00{attempt}"))
        shuffled = " ".join(words[i] for i in rng.permutation(len(words)))
        if shuffled != " ".join(words):
            return shuffled
    return None
