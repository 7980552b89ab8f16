"""Constitutional AI: the SFT model answers each prompt, critiques its own answer against a
principle of the constitution, and revises it; the revisions become SFT rows and
(revision ≻ answer) preference pairs.

Every step is real generation by the model, greedy, each request rendered as one user turn in the
model's chat template (the project's prompt format when it has none, `prompts.chat_renderer`); the
critique and revision requests are the manifest's templates filled with the prompt, the answer,
the principle and the critique. The principle of a prompt is picked by a seeded sha256 of the
prompt, so the data set is the same bytes on every run of the same model.

The prompts are the manifest's files and, unless `red_team: false`, the part of the shipped
red-team prompts not held out: `split_red_team` keeps `held_out_fraction` of them (by a salted
hash) for the gate that compares the refusal rates of the policies trained with and without these
pairs (llm_assets/evaluation/cai_gate.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from llm_assets.hf_models import load_model, load_tokenizer
from llm_assets.jsonl import read_prompt_file, read_written_jsonl
from llm_assets.manifest import ConstitutionRecipe
from llm_assets.prompts import chat_renderer, has_chat_template, render_prompt

GENERATIONS_FILE, SFT_FILE, PAIRS_FILE = "generations.jsonl", "sft.jsonl", "pairs.jsonl"
# The shipped red-team prompts (evaluation's data, read here as a file: posttrain sits below evaluation).
RED_TEAM_FILE = Path(__file__).parents[1] / "evaluation" / "data" / "red_team.jsonl"
# The project's format has no end-of-turn token: a reply ends where the model starts a next turn.
_TURN_START = "\n### "


class ConstitutionError(ValueError):
    """A constitution's prompts that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class CaiExample:
    prompt: str  # the request, as written (not rendered)
    principle: str
    answer: str  # the SFT model's first answer
    critique: str
    revision: str


def _salted(seed: int, salt: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}:{text}".encode()).digest()[:8], "big")


def split_red_team(prompts: Sequence[str], held_out_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(prompts CAI may use, prompts held out for the gate), by a salted hash of each prompt: the same
    prompt always lands on the same side, whatever else the file holds."""
    cut = held_out_fraction * 2**64
    held = [p for p in prompts if _salted(seed, "cai-held-out", p) < cut]
    return [p for p in prompts if p not in held], held


def principle_for(prompt: str, principles: Sequence[str], seed: int) -> str:
    """The principle a prompt's answer is critiqued against: sampled by a seeded hash of the prompt."""
    return principles[_salted(seed, "cai-principle", prompt) % len(principles)]


def constitution_prompts(recipe: ConstitutionRecipe, *, seed: int) -> list[str]:
    """The prompts CAI answers: the shipped red-team prompts not held out (unless red_team is false),
    then each prompt file's, each prompt once, in that order. A user file's prompt that is a held-out
    red-team prompt is refused: the gate measures on those."""
    used, held_out = split_red_team(read_prompt_file(RED_TEAM_FILE, ConstitutionError), recipe.held_out_fraction, seed)
    prompts = list(used) if recipe.red_team else []
    for source in recipe.prompt_files:
        leaked = [p for p in read_prompt_file(Path(source.path), ConstitutionError) if p in held_out]
        if leaked:
            raise ConstitutionError(f"{source.path}: {len(leaked)} prompt(s) are held-out red-team prompts the CAI "
                                    f"gate measures refusals on (first: {leaked[0]!r}); remove them")
        prompts += read_prompt_file(Path(source.path), ConstitutionError)
    return list(dict.fromkeys(prompts))


@torch.no_grad()
def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[str], *,
                     max_new_tokens: int, batch_size: int) -> list[str]:
    """The model's greedy reply to each request, sent as one user turn in its chat template.

    Prompts longer than the context (less `max_new_tokens`) keep their end, where the request and
    the assistant header are.
    """
    context = model.config.max_position_embeddings
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's context of "
                         f"{context} tokens; lower stages.constitution.max_new_tokens")
    render, templated = chat_renderer(tokenizer), has_chat_template(tokenizer)
    # A decoder continues the last token of each row: batches are padded, and cut, on the left.
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    replies: list[str] = []
    for start in range(0, len(requests), batch_size):
        batch = [render([{"role": "user", "content": r}]) for r in requests[start:start + batch_size]]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                            max_length=context - max_new_tokens).to(model.device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        replies += [(t if templated else t.split(_TURN_START, 1)[0]).strip() for t in texts]
    return replies


def run_cai(model_dir: Path, prompts: Sequence[str], recipe: ConstitutionRecipe, *, seed: int) -> list[CaiExample]:
    """Answer, critique and revise every prompt with the model in `model_dir` (three batched passes)."""
    if not prompts:
        raise ConstitutionError("stages.constitution has no prompts: keep red_team: true or add prompt_files")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(AutoModelForCausalLM, model_dir, tokenizer).eval()

    def replies(requests: list[str]) -> list[str]:
        return generate_replies(model, tokenizer, requests, max_new_tokens=recipe.max_new_tokens,
                                batch_size=recipe.batch_size)

    principles = [principle_for(p, recipe.principles, seed) for p in prompts]
    answers = replies(list(prompts))
    critiques = replies([recipe.critique_template.format(prompt=p, answer=a, principle=c)
                         for p, a, c in zip(prompts, answers, principles, strict=True)])
    revisions = replies([recipe.revision_template.format(prompt=p, answer=a, principle=c, critique=k)
                         for p, a, c, k in zip(prompts, answers, principles, critiques, strict=True)])
    return [CaiExample(*row) for row in zip(prompts, principles, answers, critiques, revisions, strict=True)]


def _jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")


def write_cai_dataset(examples: Sequence[CaiExample], out_dir: Path) -> dict[str, int]:
    """`generations.jsonl` (every step of every prompt), `sft.jsonl` ({"prompt", "completion": the
    revision}) and `pairs.jsonl` ({"prompt", "chosen": the revision, "rejected": the answer}); prompts
    in the project's format, as the other data sets store them. A revision that is empty or repeats
    the answer gives no row: it would teach nothing, and trl refuses chosen == rejected."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = [e for e in examples if e.revision and e.revision != e.answer]
    prompt = {e.prompt: render_prompt([{"role": "user", "content": e.prompt}]) for e in kept}
    (out_dir / GENERATIONS_FILE).write_bytes(_jsonl([asdict(e) for e in examples]))
    (out_dir / SFT_FILE).write_bytes(_jsonl([{"prompt": prompt[e.prompt], "completion": e.revision} for e in kept]))
    (out_dir / PAIRS_FILE).write_bytes(_jsonl([{"prompt": prompt[e.prompt], "chosen": e.revision,
                                                "rejected": e.answer} for e in kept]))
    return {"prompts": len(examples), "pairs": len(kept), "unrevised": len(examples) - len(kept)}


def read_cai_pairs(directory: Path) -> list[dict[str, str]]:
    """The preference pairs of a cai_dataset artifact."""
    return read_written_jsonl(directory / PAIRS_FILE, ConstitutionError,
                              f"a cai_dataset holds {PAIRS_FILE}", "rematerialize cai_dataset")
