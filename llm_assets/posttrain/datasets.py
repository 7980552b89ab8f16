"""The SFT and preference data sets: read from user JSONL files and/or derived from the corpus.

Pure functions over polars frames, no Dagster; the assets wrap them.

Prompt format. The tiny tokenizers trained here have no chat template, so every prompt is plain
text in one fixed format, rendered by :func:`render_prompt`::

    ### System:
    You are terse.

    ### User:
    What does `json.decoder.JSONDecoder.decode` do?

    ### Assistant:

Each turn is a header line, its content and a blank line; the prompt always ends with the
assistant header and a newline, and the model's answer (the completion, or chosen/rejected) follows
it directly. Previous assistant turns of a conversation are part of the prompt. EOS is not part of
the completion: trl appends the tokenizer's own.

Rows. SFT rows are ``{"id", "source", "prompt", "completion"}`` and preference rows
``{"id", "source", "prompt", "chosen", "rejected"}``, all plain strings: the prompt-completion
format of trl's SFTTrainer and the explicit-prompt preference format of DPOTrainer and
RewardTrainer. ``id`` and ``source`` are provenance: ``stdlib:json/decoder.py::JSONDecoder.decode``
and ``corpus:stdlib`` for an example derived from a docstring, ``sft.jsonl:17`` and ``file:sft.jsonl``
for line 17 of a user file (the file's name only, so ids do not depend on the machine).

User files (one JSON object per line, blank lines skipped). SFT: ``{"messages": [{"role":
"system"|"user"|"assistant", "content": str}, ...]}`` whose last message is the assistant's answer,
or ``{"prompt": str, "completion": str}``. Preference: ``{"prompt": str, "chosen": str,
"rejected": str}``. A ``prompt`` string is the user's turn and is rendered as such, unless it is
already in the format above (so a written ``train.jsonl`` can be fed back as a user file). Other keys
are ignored, so records may carry their own metadata.

Derived examples. A docstring document of the corpus becomes the question what its object does,
answered with the docstring's first paragraph(s). Everything is a pure function of the input: the
phrasing is picked by the sha256 of the id, the wrong answers of preference pairs by a seeded
sha256 order, never by Python's ``hash()`` (salted per process) or by input order.

Decontamination (:func:`drop_eval_overlap`) is strict: one shared word n-gram with an eval text is
enough to drop an example, and so is a prompt too short to have an n-gram whose words occur in
order in an eval text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# The same tokens and hashes as dedup and the contamination report.
from llm_assets.data.dedup import text_shingles, tokens
from llm_assets.manifest import PosttrainDataRecipe, RejectedFrom

ROLES = ("system", "user", "assistant")
_HEADERS = {role: f"### {role.capitalize()}:\n" for role in ROLES}
ASSISTANT_HEADER = _HEADERS["assistant"]
# Header lines are template, not content: left in, they would give every prompt the n-grams
# "user ... assistant" and shift every short prompt out of reach of the containment check.
_HEADER_LINE = re.compile(r"^### (?:System|User|Assistant):$", re.MULTILINE)

SFT_COLUMNS = ("id", "source", "prompt", "completion")
PREFERENCE_COLUMNS = ("id", "source", "prompt", "chosen", "rejected")
MAX_REPORTED_ERRORS = 20
TRAIN_FILE, VAL_FILE = "train.jsonl", "val.jsonl"
_VAL_SALT = "llm-assets/posttrain/val"
_CAP_SALT = "llm-assets/posttrain/cap"

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


class DataSetError(ValueError):
    """A post-training data set cannot be built; the message names the file, line, field and fix."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass(frozen=True)
class SplitDataSet:
    """One data set's train and val rows, and the counts that explain how they came to be."""

    train: pl.DataFrame
    val: pl.DataFrame
    stats: dict = field(default_factory=dict)


# -- the prompt format --------------------------------------------------------------------------


def render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for the assistant's next turn after ``messages`` (every role allowed)."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in _HEADERS:
            raise DataSetError(f"messages[{i}].role: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataSetError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        parts.append(f"{_HEADERS[role]}{content}\n\n")
    return "".join(parts) + ASSISTANT_HEADER


def _as_prompt(text: str) -> str:
    """A user's prompt string in the prompt format; one already in it is kept as it is."""
    if text.endswith(ASSISTANT_HEADER) and text.startswith(("### System:\n", "### User:\n")):
        return text
    return render_prompt([{"role": "user", "content": text}])


def _prompt_content(text: str) -> str:
    return _HEADER_LINE.sub(" ", text)


# -- user JSONL files ---------------------------------------------------------------------------


class _LineError(Exception):
    """One record's problem; the reader adds the file and line."""


def _text(record: dict, key: str, where: str = "") -> str:
    name = f"{where}{key}"
    if key not in record:
        raise _LineError(f"field {name!r} is missing; add it as a non-empty string")
    value = record[key]
    if not isinstance(value, str):
        raise _LineError(f"field {name!r} must be a string, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise _LineError(f"field {name!r} is empty; give it text or remove the line")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _LineError(
            f"field {name!r} contains an unpaired surrogate escape (like \\ud800), which is no text; fix the escape"
        ) from None
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _messages_example(record: dict) -> tuple[str, str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _LineError(
            "field 'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects, "
            f"got {_short(messages)}"
        )
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(message, dict):
            raise _LineError(
                f"field 'messages[{i}]' must be an object {{\"role\", \"content\"}}, got {_short(message)}"
            )
        if "role" not in message and {"from", "value"} <= message.keys():
            raise _LineError(
                f"field 'messages[{i}]' uses 'from'/'value' (ShareGPT); rename them to 'role'/'content' "
                f"with roles {', '.join(ROLES)}"
            )
        role = _text(message, "role", where)
        if role not in ROLES:
            raise _LineError(f"field '{where}role' has unknown role {role!r}; use one of {', '.join(ROLES)}")
        checked.append({"role": role, "content": _text(message, "content", where)})
    if checked[-1]["role"] != "assistant":
        raise _LineError(
            f"field 'messages' ends with a {checked[-1]['role']!r} message; the last message must be the "
            "assistant's answer (it is the completion)"
        )
    if not any(m["role"] == "user" for m in checked[:-1]):
        raise _LineError("field 'messages' has no user message before the assistant's answer; add the question")
    return render_prompt(checked[:-1]), checked[-1]["content"]


def _sft_record(record: dict) -> tuple[str, ...]:
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise _LineError("has both 'messages' and 'prompt'/'completion'; use one format per line")
        return _messages_example(record)
    if "prompt" not in record and "completion" not in record:
        raise _LineError(
            f"has neither 'messages' nor 'prompt' and 'completion' (keys: {', '.join(sorted(record)) or 'none'}); "
            "write {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}"
        )
    return _as_prompt(_text(record, "prompt")), _text(record, "completion")


def _preference_record(record: dict) -> tuple[str, ...]:
    prompt, chosen, rejected = (_text(record, key) for key in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise _LineError("fields 'chosen' and 'rejected' are identical; a pair must prefer one answer to another")
    return _as_prompt(prompt), chosen, rejected


def _read_jsonl(
    path: Path, parse: Callable[[dict], tuple[str, ...]], columns: tuple[str, ...], manifest_field: str, shape: str
) -> pl.DataFrame:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataSetError(f"{path}: no such file; fix its path in {manifest_field} of the manifest") from None
    except IsADirectoryError:
        raise DataSetError(f"{path}: is a directory, not a JSONL file; fix {manifest_field} in the manifest") from None
    rows: list[tuple[str, ...]] = []
    errors: list[str] = []
    bad = 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        line = line.removesuffix(b"\r")
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM is an editor's habit, not an error
        if not line.strip():
            continue
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _LineError(f"not valid UTF-8 at byte {exc.start} of the line; save the file as UTF-8") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _LineError(
                    f"invalid JSON at column {exc.colno}: {exc.msg}; each line must be one complete JSON object"
                ) from None
            if not isinstance(record, dict):
                raise _LineError(f"expected a JSON object {shape}, got a {type(record).__name__}")
            rows.append((f"{path.name}:{number}", f"file:{path.name}", *parse(record)))
        except _LineError as exc:
            bad += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"{path}:{number}: {exc}")
    if errors:
        more = f"\n  ... and {bad - len(errors)} more" if bad > len(errors) else ""
        raise DataSetError(
            f"{path}: {bad} malformed line{'s' * (bad != 1)} (each line must be {shape}; fix or remove "
            f"them):\n  " + "\n  ".join(errors) + more,
            errors,
        )
    if not rows:
        raise DataSetError(f"{path}: no records, only blank lines; add examples or remove it from {manifest_field}")
    return pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String), orient="row")


def read_sft_jsonl(path: Path | str) -> pl.DataFrame:
    """SFT rows of a user file; every malformed line (up to a cap) is reported in one DataSetError."""
    return _read_jsonl(
        Path(path), _sft_record, SFT_COLUMNS, "stages.posttrain_data.sft_files",
        '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}',
    )


def read_preference_jsonl(path: Path | str) -> pl.DataFrame:
    """Preference rows of a user file; every malformed line (up to a cap) is reported in one DataSetError."""
    return _read_jsonl(
        Path(path), _preference_record, PREFERENCE_COLUMNS, "stages.posttrain_data.preference_files",
        '{"prompt": ..., "chosen": ..., "rejected": ...}',
    )


# -- examples derived from the corpus -----------------------------------------------------------


def _sha256_int(text: str) -> int:
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
    return phrasings[_sha256_int(doc_id) % len(phrasings)].format(name=name)


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


def _docstring_rows(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
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
    for doc_id, text, source, _ in _docstring_rows([frame]).iter_rows():
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
        order = sorted(range(len(d.ids)), key=lambda i: (_sha256_int(f"{seed}\x00{d.ids[i]}"), d.ids[i]))
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
        rng = np.random.default_rng(_sha256_int(f"{key}\x00{attempt}"))
        shuffled = " ".join(words[i] for i in rng.permutation(len(words)))
        if shuffled != " ".join(words):
            return shuffled
    return None


# -- decontamination ----------------------------------------------------------------------------


def _word_counts(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((len(tokens(t)) for t in texts), dtype=np.int64, count=len(texts))


@dataclass
class _EvalGrams:
    """One eval set's gram hashes by gram length, computed on demand, and its short texts."""

    texts: list[str]
    ngram: int
    by_length: dict[int, np.ndarray] = field(default_factory=dict)
    short: dict[int, np.ndarray] = field(default_factory=dict)  # m < ngram → hashes of the texts of m words

    def __post_init__(self) -> None:
        hashes, owners = text_shingles(self.texts, self.ngram)
        self.by_length[self.ngram] = np.unique(hashes)
        # Only a text with one gram can be shorter than n words; count the words of those alone.
        single = np.flatnonzero(np.bincount(owners, minlength=len(self.texts)) == 1)
        candidates = [self.texts[i] for i in single]
        words = _word_counts(candidates)
        for m in np.unique(words[(words > 0) & (words < self.ngram)]).tolist():
            short_texts = [t for t, w in zip(candidates, words) if w == m]
            self.short[m] = np.unique(text_shingles(short_texts, m)[0])

    def grams(self, m: int) -> np.ndarray:
        if m not in self.by_length:
            self.by_length[m] = np.unique(text_shingles(self.texts, m)[0])
        return self.by_length[m]


def drop_eval_overlap(
    frame: pl.DataFrame,
    text_columns: Sequence[str],
    eval_texts: Mapping[str, Sequence[str]],
    ngram: int,
    *,
    whole_text_columns: Sequence[str] = ("prompt",),
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The rows that overlap no eval text, and per eval set how many rows it made drop.

    Texts are compared as lowercase ``\\w+`` words (punctuation and whitespace do not count), the
    prompt format's header lines removed. A row is dropped when any of its ``text_columns`` shares a
    word ``ngram``-gram with an eval text. In ``whole_text_columns`` (the prompt) a text shorter than
    ``ngram`` words has no n-gram, so it is dropped when its words occur in order in an eval text;
    and an eval text shorter than ``ngram`` words drops a row whose text contains its words in
    order. Not for answer columns: a short answer such as "Yes." occurs in any large eval set by
    chance. A row can count for several eval sets.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be at least 1, got {ngram}")
    missing = [c for c in (*text_columns, *whole_text_columns) if c not in frame.columns]
    if missing:
        raise DataSetError(f"drop_eval_overlap: the frame has no column {missing[0]!r} (columns: {frame.columns})")
    counts = {name: 0 for name in eval_texts}
    if frame.is_empty() or not eval_texts:
        return frame, counts
    content = {c: [_prompt_content(t) for t in frame[c].to_list()] for c in {*text_columns, *whole_text_columns}}
    hash_parts, owner_parts = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)]
    for column in text_columns:
        h, o = text_shingles(content[column], ngram)
        hash_parts.append(h)
        owner_parts.append(o)
    hashes, owners = np.concatenate(hash_parts), np.concatenate(owner_parts)
    whole = [(content[c], _word_counts(content[c])) for c in whole_text_columns]
    dropped = np.zeros(frame.height, dtype=bool)
    for name, texts in eval_texts.items():
        index = _EvalGrams(list(texts), ngram)
        hit = np.zeros(frame.height, dtype=bool)
        hit[owners[np.isin(hashes, index.grams(ngram))]] = True
        for texts_of_rows, words in whole:
            for m in np.unique(words[(words > 0) & (words < ngram)]).tolist():
                rows = np.flatnonzero(words == m)
                own, _ = text_shingles([texts_of_rows[i] for i in rows], m)  # one gram each: the whole text
                hit[rows[np.isin(own, index.grams(m))]] = True
            for m, short in index.short.items():
                long_enough = np.flatnonzero(words >= m)
                h, o = text_shingles([texts_of_rows[i] for i in long_enough], m)
                hit[long_enough[o[np.isin(h, short)]]] = True
        counts[name] = int(hit.sum())
        dropped |= hit
    return frame.filter(pl.Series(~dropped)), counts


# -- assembly -----------------------------------------------------------------------------------


def _in_val(prompt: str, val_fraction: float) -> bool:
    return _sha256_int(f"{_VAL_SALT}\x00{prompt}") / 2**64 < val_fraction


def _cap(frame: pl.DataFrame, limit: int) -> pl.DataFrame:
    """At most ``limit`` rows, chosen by a hash of the prompt so the choice does not depend on the
    order or number of the others; the kept rows stay in their order."""
    if frame.height <= limit:
        return frame
    ranks = np.array([_sha256_int(f"{_CAP_SALT}\x00{p}") for p in frame["prompt"].to_list()], dtype=np.uint64)
    keep = np.zeros(frame.height, dtype=bool)
    keep[np.argsort(ranks, kind="stable")[:limit]] = True
    return frame.filter(pl.Series(keep))


def _assemble(
    what: str,
    columns: tuple[str, ...],
    derived: tuple[pl.DataFrame, pl.DataFrame] | None,
    derived_stats: dict,
    file_frames: list[tuple[Path, pl.DataFrame]],
    files_field: str,
    recipe: PosttrainDataRecipe,
    eval_texts: Mapping[str, Sequence[str]],
) -> SplitDataSet:
    empty = pl.DataFrame(schema=dict.fromkeys(columns, pl.String))
    train_parts, val_parts = ([derived[0]], [derived[1]]) if derived else ([], [])
    per_file: dict[str, dict[str, int]] = {}
    for path, frame in file_frames:
        to_val = pl.Series([_in_val(p, recipe.val_fraction) for p in frame["prompt"].to_list()], dtype=pl.Boolean)
        train_parts.append(frame.filter(~to_val))
        val_parts.append(frame.filter(to_val))
        counts = per_file.setdefault(path.name, {"train": 0, "val": 0})
        counts["train"] += train_parts[-1].height
        counts["val"] += val_parts[-1].height
    stats: dict[str, Any] = {**derived_stats, "files": per_file, "duplicates_removed": {}, "capped": {}}
    splits = {}
    for split, parts in (("val", val_parts), ("train", train_parts)):
        frame = pl.concat([empty, *parts])
        unique = frame.unique("prompt", keep="first", maintain_order=True)
        stats["duplicates_removed"][split] = frame.height - unique.height
        splits[split] = unique
    # A prompt in val too would be trained on and then measured on; val keeps it.
    before = splits["train"].height
    splits["train"] = splits["train"].filter(~pl.col("prompt").is_in(splits["val"]["prompt"].implode()))
    stats["train_prompts_in_val"] = before - splits["train"].height
    # Only train is decontaminated: val is never trained on, and the derived val examples come from
    # the corpus val split, which the caller may list among the eval texts itself.
    before = splits["train"].height
    answer_columns = [c for c in columns if c not in ("id", "source")]
    splits["train"], stats["dropped_overlap"] = drop_eval_overlap(
        splits["train"], answer_columns, eval_texts, recipe.ngram
    )
    stats["dropped_overlap_total"] = before - splits["train"].height
    for split in ("train", "val"):
        capped = _cap(splits[split], recipe.max_examples)
        stats["capped"][split] = splits[split].height - capped.height
        splits[split] = capped
        stats[split] = capped.height
    for split in ("train", "val"):
        if splits[split].is_empty():
            raise DataSetError(_why_empty(what, split, stats, recipe, files_field))
    return SplitDataSet(train=splits["train"], val=splits["val"], stats=stats)


def _why_empty(what: str, split: str, stats: dict, recipe: PosttrainDataRecipe, files_field: str) -> str:
    from_files = sum(c[split] for c in stats["files"].values())
    head = f"the {what} data set has no {split} examples"
    if not recipe.derive_from_corpus and not stats["files"]:
        return (
            f"{head}: derive_from_corpus is false and {files_field} is empty; add a JSONL file to {files_field} "
            "or set derive_from_corpus: true"
        )
    if recipe.derive_from_corpus and not stats["derived"][split] and not from_files:
        docs = stats["docstring_documents"][split]
        reason = (
            f"the corpus {split} split has no docstring documents (kind=docstring)" if not docs
            else f"none of the {docs} docstring documents of the corpus {split} split gave an example"
            + (" (preference pairs need two objects with different answers)" if what == "preference" else "")
        )
        where = (
            f" and the files of {files_field} gave none to {split} (by val_fraction {recipe.val_fraction})"
            if stats["files"] else f" and {files_field} is empty"
        )
        return (
            f"{head}: {reason}{where}; add examples in a JSONL file to {files_field} in the manifest, "
            "or use a python_stdlib source"
        )
    if split == "val" and not from_files and not stats["derived"]["val"]:
        return (
            f"{head}: no file example fell in val (val_fraction {recipe.val_fraction}) and none was derived from the "
            f"corpus val split; add examples to {files_field} or raise stages.posttrain_data.val_fraction"
        )
    return (
        f"{head}: every candidate was removed (duplicates: {stats['duplicates_removed'][split]}, "
        f"dropped for overlap with eval sets: {stats['dropped_overlap'] if split == 'train' else 'not applied'}, "
        f"also in val: {stats['train_prompts_in_val'] if split == 'train' else 0}); check "
        "stages.contamination.eval_sets or raise stages.posttrain_data.ngram, or add examples"
    )


def _derive_splits(
    train_frames: Iterable[pl.DataFrame],
    val_frame: pl.DataFrame,
    recipe: PosttrainDataRecipe,
    derive: Callable[[pl.DataFrame], pl.DataFrame],
) -> tuple[tuple[pl.DataFrame, pl.DataFrame] | None, dict]:
    """Derived (train, val) examples, each from its own docstrings only, so neither a val question
    nor a val answer (as a rejected one) reaches training. Val takes the val split's docstrings and
    ``val_fraction`` of the train split's (by a salted hash of the id): a corpus's val split alone
    is often too small to measure a reward model on."""
    if not recipe.derive_from_corpus:
        zero = {"train": 0, "val": 0}
        return None, {"docstring_documents": zero, "derived": zero, "derived_skipped": zero}
    train_docs = _docstring_rows(train_frames)
    held = pl.Series([_in_val(i, recipe.val_fraction) for i in train_docs["id"].to_list()], dtype=pl.Boolean)
    docs = {"train": train_docs.filter(~held),
            "val": pl.concat([_docstring_rows([val_frame]), train_docs.filter(held)]).sort("id")}
    frames = {split: derive(d) for split, d in docs.items()}
    return (frames["train"], frames["val"]), {
        "docstring_documents": {split: d.height for split, d in docs.items()},
        "derived": {split: f.height for split, f in frames.items()},
        "derived_skipped": {split: docs[split].height - frames[split].height for split in docs},
    }


def build_sft_dataset(
    train_frames: Iterable[pl.DataFrame],
    val_frame: pl.DataFrame,
    user_files: Sequence[Path | str],
    recipe: PosttrainDataRecipe,
    eval_texts: Mapping[str, Sequence[str]],
) -> SplitDataSet:
    """The SFT data set: derived examples (train from the train split's docstrings, val from the val
    split's and a held-out fraction of the train split's) and user files (split by a salted hash of the prompt), deduplicated by prompt,
    decontaminated, capped. Raises DataSetError, saying why, when train or val would be empty."""
    files = [(Path(p), read_sft_jsonl(p)) for p in user_files]
    derived, stats = _derive_splits(
        train_frames, val_frame, recipe, lambda docs: derive_sft_examples(docs, recipe.max_answer_chars)
    )
    return _assemble("SFT", SFT_COLUMNS, derived, stats, files, "stages.posttrain_data.sft_files", recipe, eval_texts)


def build_preference_dataset(
    train_frames: Iterable[pl.DataFrame],
    val_frame: pl.DataFrame,
    user_files: Sequence[Path | str],
    recipe: PosttrainDataRecipe,
    eval_texts: Mapping[str, Sequence[str]],
    seed: int,
) -> SplitDataSet:
    """The preference data set, assembled as :func:`build_sft_dataset`; derived pairs take their
    rejected answers from the same split only."""
    files = [(Path(p), read_preference_jsonl(p)) for p in user_files]
    derived, stats = _derive_splits(
        train_frames, val_frame, recipe,
        lambda docs: derive_preference_pairs(docs, recipe.max_answer_chars, seed, recipe.rejected_from),
    )
    return _assemble(
        "preference", PREFERENCE_COLUMNS, derived, stats, files, "stages.posttrain_data.preference_files",
        recipe, eval_texts,
    )


# -- the artifact files -------------------------------------------------------------------------


def _jsonl_bytes(frame: pl.DataFrame) -> bytes:
    return "".join(
        json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in frame.iter_rows(named=True)
    ).encode("utf-8")


def _cell(text: str, limit: int = 100) -> str:
    flat = " ".join(_prompt_content(text).split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("\\", "\\\\").replace("|", "\\|")


def write_dataset(ds: SplitDataSet, out_dir: Path | str) -> dict:
    """Write ``train.jsonl`` and ``val.jsonl`` (UTF-8, one object per line, sorted keys: readable, and
    loadable by ``datasets.load_dataset("json", ...)``); returns metadata for the asset: row
    counts, mean lengths in characters, and a markdown table of the first train examples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRAIN_FILE).write_bytes(_jsonl_bytes(ds.train))
    (out_dir / VAL_FILE).write_bytes(_jsonl_bytes(ds.val))
    text_columns = [c for c in ds.train.columns if c not in ("id", "source")]
    both = pl.concat([ds.train, ds.val])
    metadata: dict[str, Any] = {"train_examples": ds.train.height, "val_examples": ds.val.height}
    for column in text_columns:
        mean = both[column].str.len_chars().mean() if both.height else 0.0
        metadata[f"mean_{column}_chars"] = round(float(mean or 0.0), 1)
    header = "| " + " | ".join(text_columns) + " |\n|" + "---|" * len(text_columns) + "\n"
    rows = "\n".join(
        "| " + " | ".join(_cell(row[c]) for c in text_columns) + " |" for row in ds.train.head(3).iter_rows(named=True)
    )
    metadata["preview_markdown"] = header + rows
    return metadata


def read_dataset(directory: Path | str) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of a directory written by :func:`write_dataset`."""
    directory = Path(directory)
    missing = f"the data set directory must hold {TRAIN_FILE} and {VAL_FILE} (rematerialize it)"
    splits = [read_written_jsonl(directory / name, DataSetError, missing, "rematerialize it")
              for name in (TRAIN_FILE, VAL_FILE)]
    return splits[0], splits[1]


def read_written_jsonl(path: Path, error: type[ValueError], missing: str, remedy: str) -> list[dict]:
    """The rows of a JSONL file this project wrote (blank lines skipped); a missing or damaged file
    raises ``error`` naming the file (and the line), with ``missing`` / ``remedy`` saying what to do."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise error(f"{path}: missing; {missing}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: invalid JSON ({exc.msg}); the file is damaged, {remedy}") from None
    return rows
