"""A task a tiny model learns in seconds: the colour of a "<size> <shape>" is fixed by its shape.

Held-out rows use size/shape combinations never trained on, so a model that has learnt the rule
(not the rows) scores them well: SFT val loss falls, and a reward model ranks the right colour
above a wrong one on pairs it has not seen.
"""

from __future__ import annotations

SHAPES = ("cube", "ball", "cone", "ring", "star", "disc")
COLOURS = ("red", "blue", "green", "pink", "gold", "grey")  # the colour of SHAPES[i] is COLOURS[i]
SIZES = ("tiny", "small", "big", "huge", "long", "flat", "round", "thin", "wide", "tall")


def _combos(*, held_out: bool) -> list[tuple[str, int]]:
    # One combination in five is held out, and every shape keeps trained sizes.
    return [(size, s) for i, size in enumerate(SIZES) for s in range(len(SHAPES)) if ((i + s) % 5 == 0) == held_out]


def prompt(size: str, shape: int) -> str:
    return f"### User:\nWhat is the colour of the {size} {SHAPES[shape]}?\n### Assistant:\n"


def answer(size: str, shape: int, colour: int) -> str:
    return f"The {size} {SHAPES[shape]} is {COLOURS[colour]}."


def sft_rows(*, held_out: bool) -> list[dict[str, str]]:
    return [{"prompt": prompt(size, s), "completion": answer(size, s, s)} for size, s in _combos(held_out=held_out)]


def preference_rows(*, held_out: bool) -> list[dict[str, str]]:
    rows = []
    for i, (size, s) in enumerate(_combos(held_out=held_out)):
        wrong = (s + 1 + i % (len(COLOURS) - 1)) % len(COLOURS)  # any colour but the right one
        rows.append({"prompt": prompt(size, s), "chosen": answer(size, s, s), "rejected": answer(size, s, wrong)})
    return rows


def pretrain_text() -> list[str]:
    """Statements of the rule (all combinations) and the chat markers, without the Q/A format SFT teaches."""
    facts = [f"the {size} {SHAPES[s]} is {COLOURS[s]}." for size in SIZES for s in range(len(SHAPES))]
    return facts + ["### User:", "### Assistant:", "What is the colour of it?"]
