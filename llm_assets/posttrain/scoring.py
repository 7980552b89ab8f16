"""Our own figures of post-trained models, computed one way for every model they compare.

Every sequence is encoded as trl's SFT and DPO trainers encode it (`encode`): the prompt, and the
prompt + completion + eos, are tokenized separately; the completion starts where the two token
sequences diverge; the sequence is cut to its first `max_length` tokens. A row whose prompt alone
fills `max_length` has no completion token left: trl drops such rows, and so do these figures.
Models run teacher-forced, in their own dtype, in eval mode, without gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length

from llm_assets.posttrain.rows import PAIR_KEYS, SFT_KEYS, Rows, records


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    completion_start: int  # index of the first completion token in ids; ≥ 1, so every one has a prediction

    @property
    def completion_ids(self) -> list[int]:
        return self.ids[self.completion_start :]


@dataclass(frozen=True)
class Pairwise:
    """How a score ranks chosen over rejected completions of the same prompts."""

    accuracy: float  # share of pairs where chosen scores above rejected; a tie counts half (chance)
    mean_margin: float  # mean of score(chosen) − score(rejected)
    pairs: int


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int) -> Encoded:
    """prompt + completion + eos as trl's SFTTrainer and DPOTrainer tokenize it (see the module docstring)."""
    eos = tokenizer.eos_token
    text = prompt + (completion if completion.endswith(eos) else completion + eos)
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    ids = tokenizer(text=text)["input_ids"]
    return Encoded(ids=ids[:max_length], completion_start=max(1, common_prefix_length(prompt_ids, ids)))


def completion_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Rows, *, max_length: int,
                    batch_size: int = 8) -> float:
    """Mean negative log-likelihood, in nats per token, of the completion tokens (eos included) of
    SFT rows given their prompts: the token-weighted mean over all rows."""
    encoded_rows = _encode_rows(tokenizer, records(rows, SFT_KEYS, "SFT"), ("completion",), max_length)
    nll, tokens = 0.0, 0
    for batch in _batches([encoded for (encoded,) in encoded_rows], batch_size):
        for logps, encoded in zip(_completion_log_probs(model, batch, tokenizer.pad_token_id), batch, strict=True):
            nll -= _token_log_probs(logps, encoded).sum().item()
            tokens += len(encoded.completion_ids)
    return nll / tokens


def policy_kl(policy: PreTrainedModel, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Rows, *,
              max_length: int, batch_size: int = 8) -> float:
    """KL(policy ‖ reference) in nats per sequence, teacher-forced on held-out prompt + chosen rows.

    At each position that predicts a completion token (eos included), the exact KL between the two
    next-token distributions over the full vocabulary, Σ_v π(v)·(log π(v) − log π_ref(v)); summed
    over the completion's positions, then averaged over rows. The context is the row's chosen
    completion, not a sample from the policy, so this is the divergence along fixed held-out
    trajectories: 0 for identical models, and it grows as the policy moves from the reference.
    """
    sequences = [encoded for (encoded,) in _encode_rows(tokenizer, records(rows, PAIR_KEYS, "KL"), ("chosen",),
                                                        max_length)]
    total = 0.0
    for batch in _batches(sequences, batch_size):
        policy_logps = _completion_log_probs(policy, batch, tokenizer.pad_token_id)
        reference_logps = _completion_log_probs(reference, batch, tokenizer.pad_token_id)
        for p, q in zip(policy_logps, reference_logps, strict=True):
            total += (p.exp() * (p - q)).sum().item()
    return total / len(sequences)


def reward_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  completions: Sequence[str], *, max_length: int, batch_size: int = 8) -> list[float]:
    """The reward model's score of each prompt + completion + eos: the text trl's RewardTrainer trains it on."""
    encoded = [encode(tokenizer, prompt, completion, max_length)
               for prompt, completion in zip(prompts, completions, strict=True)]
    return _scores(model, encoded, tokenizer.pad_token_id, batch_size).tolist()


def reward_pairwise(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Rows, *, max_length: int,
                    batch_size: int = 8) -> Pairwise:
    """How the reward model ranks score(prompt + chosen) against score(prompt + rejected)."""
    encoded_pairs = _encode_rows(tokenizer, records(pairs, PAIR_KEYS, "preference"), ("chosen", "rejected"),
                                 max_length)
    chosen = _scores(model, [chosen for chosen, _ in encoded_pairs], tokenizer.pad_token_id, batch_size)
    rejected = _scores(model, [rejected for _, rejected in encoded_pairs], tokenizer.pad_token_id, batch_size)
    return pairwise(chosen, rejected)


def implicit_reward_pairwise(policy: PreTrainedModel, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                             pairs: Rows, *, beta: float, max_length: int, batch_size: int = 8) -> Pairwise:
    """How DPO's implicit reward β·(log π(y|x) − log π_ref(y|x)), log-probabilities summed over the
    completion's tokens as trl's sigmoid loss sums them, ranks chosen against rejected.

    Before any training the policy is the reference: every reward is 0, and the accuracy is 0.5.
    """
    encoded_pairs = _encode_rows(tokenizer, records(pairs, PAIR_KEYS, "preference"), ("chosen", "rejected"),
                                 max_length)
    rewards = []
    for side in (0, 1):
        sequences = [pair[side] for pair in encoded_pairs]
        ratio = (_sequence_log_probs(policy, sequences, tokenizer.pad_token_id, batch_size)
                 - _sequence_log_probs(reference, sequences, tokenizer.pad_token_id, batch_size))
        rewards.append(beta * ratio)
    return pairwise(*rewards)


def pairwise(chosen: torch.Tensor, rejected: torch.Tensor) -> Pairwise:
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return Pairwise(accuracy=wins.mean().item(), mean_margin=(chosen - rejected).mean().item(), pairs=len(chosen))


def _encode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]], completion_keys: Sequence[str],
                 max_length: int) -> list[tuple[Encoded, ...]]:
    """Each row's prompt with each of its `completion_keys`, encoded; a row where any of them keeps no
    completion token is dropped."""
    encoded = [tuple(encode(tokenizer, row["prompt"], row[key], max_length) for key in completion_keys) for row in rows]
    kept = [row for row in encoded if all(e.completion_ids for e in row)]
    if not kept:
        raise ValueError(f"every prompt fills max_length={max_length} tokens, leaving no completion token to score: "
                         "raise max_length or shorten the prompts")
    return kept


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def _inference(model: PreTrainedModel) -> Iterator[torch.device]:
    """Eval mode (no dropout) without gradients; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _padded(sequences: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask."""
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.ids)] = torch.tensor(sequence.ids)
        attention_mask[row, : len(sequence.ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _completion_log_probs(model: PreTrainedModel, sequences: list[Encoded], pad_id: int) -> list[torch.Tensor]:
    """Per sequence, log-probabilities over the vocabulary at the positions that predict its
    completion tokens: a [completion tokens, vocab] fp32 tensor."""
    with _inference(model) as device:
        logits = model(**_padded(sequences, pad_id, device)).logits
    # Position t predicts token t + 1; log_softmax only the rows needed, in fp32.
    return [logits[row, s.completion_start - 1 : len(s.ids) - 1].float().log_softmax(-1)
            for row, s in enumerate(sequences)]


def _token_log_probs(logps: torch.Tensor, sequence: Encoded) -> torch.Tensor:
    """log p of each completion token, from `_completion_log_probs` of that sequence."""
    targets = torch.tensor(sequence.completion_ids, device=logps.device)
    return logps.gather(-1, targets[:, None]).squeeze(-1)


def _sequence_log_probs(model: PreTrainedModel, sequences: list[Encoded], pad_id: int,
                        batch_size: int) -> torch.Tensor:
    """log p(completion | prompt) of each sequence: the sum over its completion tokens."""
    sums = []
    for batch in _batches(sequences, batch_size):
        for logps, sequence in zip(_completion_log_probs(model, batch, pad_id), batch, strict=True):
            sums.append(_token_log_probs(logps, sequence).sum().item())
    return torch.tensor(sums)


def _scores(model: PreTrainedModel, sequences: list[Encoded], pad_id: int, batch_size: int) -> torch.Tensor:
    """A sequence classifier's single logit per sequence (it pools at the last non-pad token)."""
    scores = []
    for batch in _batches(sequences, batch_size):
        with _inference(model) as device:
            scores.append(model(**_padded(batch, pad_id, device)).logits[:, 0].float().cpu())
    return torch.cat(scores)
