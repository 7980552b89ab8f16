"""A continuous-batching generation engine: requests from any number of threads, one model, one worker thread.

Callers `submit` prompts' token ids and get one `concurrent.futures.Future` per prompt (cancel it to
free the request's slot); an optional listener also receives each answer's text as it grows, for
streaming. One worker thread owns the model and runs one loop, a decoding step per turn:

  1. drop the rows whose future was cancelled (a client that went away);
  2. one forward pass over every live row's last token, with the batch's KV cache; pick each row's
     next token (greedy, or sampled with its own seeded generator); answer and drop the rows that
     ended (EOS, a stop string, max_tokens);
  3. take queued requests into the free slots (up to `max_batch_size`): their prompts are prefilled
     in one forward pass of their own, their first token picked, and their KV cache joined to the
     batch's (the shorter one left-padded, padding masked).

So a request joins the running batch at the next step and leaves it the step it ends: a long
answer does not hold a short one back. Rows are left-padded so that every row's next token sits in
the last column, positions count real tokens only (as `generate` derives them), and columns that
are padding in every row are cut off as rows leave. Greedy decoding (temperature 0) of a request
gives the tokens `model.generate(do_sample=False)` gives for the same prompt alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Literal

import torch
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


class EngineClosedError(RuntimeError):
    """The engine was closed before (or while) the request was served."""


class EngineBusyError(RuntimeError):
    """The queue has no room for the request: the caller should retry later. Nothing was queued."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None  # sampling only; the same seed gives the same tokens
    stop: Sequence[str] = ()  # the text ends before the first of these
    top_logprobs: int | None = None  # None: no log-probabilities; k ≥ 0: each token's, and its k likeliest rivals


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability under the model (before temperature), and the likeliest tokens."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to an answer: text that no stop string can take back any more."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int  # every token the model produced for this request, EOS included
    finish_reason: Literal["stop", "length"]
    logprobs: tuple[TokenLogprob, ...] = ()  # every produced token but EOS, when asked for
    first_token_s: float = 0.0  # from submit to the first token


@dataclass(frozen=True)
class StepStats:
    rows: int  # rows decoded in this step (newcomers' prefill included): one token each
    seconds: float


# Receives (index of the request in its `submit` call, a Delta or the final Generation or an exception).
Listener = Callable[[int, "Delta | Generation | BaseException"], None]


@dataclass
class _Row:
    request: GenerationRequest
    future: Future
    generator: torch.Generator | None
    index: int
    listener: Listener | None
    submitted: float
    tokens: list[int] = field(default_factory=list)
    # The answer's text, grown a token at a time: decoding the whole answer again at every step
    # would cost time quadratic in its length. The stream holds back a token's bytes until they
    # make a whole character.
    text: str = ""
    detokenizer: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_chars: int = 0  # of the text, already handed to the listener
    sent_logprobs: int = 0
    first_token_s: float = 0.0


@dataclass
class _Batch:
    """The live rows and their state on the model's side: KV cache, attention mask, next positions and tokens."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached columns + 1]: the column of the pending token included
    positions: torch.Tensor  # [rows, 1]: the position of each row's pending token
    pending: torch.Tensor  # [rows, 1]: each row's last token, not yet in the cache

    def select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        # Columns that are padding in every remaining row (a long row has left): cut them off.
        drop = int(self.mask.any(dim=0).int().argmax())
        if drop:
            self.mask = self.mask[:, drop:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]

    def join(self, other: _Batch) -> None:
        """Append `other`'s rows; whichever batch is narrower is left-padded (and masked) to the other's width."""
        width = max(self.mask.shape[1], other.mask.shape[1])  # the cache is one column narrower: the pending token

        def widen(t: torch.Tensor, dim: int, to: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = to - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim=dim) if shape[dim] else t

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([widen(mine.keys, 2, width - 1), widen(theirs.keys, 2, width - 1)])
            mine.values = torch.cat([widen(mine.values, 2, width - 1), widen(theirs.values, 2, width - 1)])
        self.mask = torch.cat([widen(self.mask, 1, width), widen(other.mask, 1, width)])
        self.positions = torch.cat([self.positions, other.positions])
        self.pending = torch.cat([self.pending, other.pending])
        self.rows += other.rows


class Engine:
    """Serves `GenerationRequest`s with continuous batching on one worker thread; `start()` it, `close()` it."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch_size: int = 8,
                 max_queued: int = 256, on_step: Callable[[StepStats], None] | None = None):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad and an eos token: batches are padded and answers end at eos; "
                             "set them in its tokenizer_config.json")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.on_step = on_step
        self._queue: deque[_Row] = deque()
        self._wakeup = threading.Condition()
        # The fast tokenizer's Rust state is not safe to share between threads (its padding and
        # truncation settings are mutated per call): request handlers and the worker take turns.
        self._tokenizer_lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._closed = False
        self.running = 0  # rows in the live batch

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def queued(self) -> int:
        with self._wakeup:
            return sum(not row.future.cancelled() for row in self._queue)

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text)["input_ids"]

    def start(self) -> Engine:
        self._worker.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Finish the rows being decoded, fail every request still queued, stop the worker."""
        with self._wakeup:
            self._closed = True
            self._fail_queued()
            self._wakeup.notify()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def _fail_queued(self) -> None:
        while self._queue:
            row = self._queue.popleft()
            _resolve(row, EngineClosedError("the server is shutting down; retry on another replica"))

    def submit(self, requests: Sequence[GenerationRequest], listener: Listener | None = None) -> list[Future]:
        """Queue all of `requests` or none of them (EngineBusyError when they do not all fit)."""
        for request in requests:
            if not request.prompt_ids:
                raise ValueError("the prompt is empty: it needs at least one token")
            if request.max_tokens < 1:
                raise ValueError(f"max_tokens must be ≥ 1, got {request.max_tokens}")
            if len(request.prompt_ids) + request.max_tokens > self.context_length:
                raise ValueError(f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed "
                                 f"the model's context of {self.context_length} tokens")
        now = time.perf_counter()
        rows = [_Row(r, Future(), _generator(r, self.model.device), i, listener, now) for i, r in enumerate(requests)]
        with self._wakeup:
            if self._closed:
                raise EngineClosedError("the server is shutting down; retry on another replica")
            waiting = sum(not row.future.cancelled() for row in self._queue)
            if waiting + len(rows) > self.max_queued:
                raise EngineBusyError(f"{waiting} requests are queued and this one brings {len(rows)}; the server "
                                      f"queues at most {self.max_queued}")
            self._queue.extend(rows)
            self._wakeup.notify()
        return [row.future for row in rows]

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        batch: _Batch | None = None
        while True:
            started = time.perf_counter()
            if batch is not None:
                batch.select([i for i, row in enumerate(batch.rows) if not row.future.cancelled()])
            live = batch.rows if batch is not None else []
            self.running = len(live)
            joining = self._take(self.max_batch_size - len(live), wait=not live)
            if joining is None:
                return  # closed, and nothing left to decode
            try:
                if live:
                    self._step(batch)
                if joining:
                    newcomers = self._prefill(joining)
                    if batch is None or not batch.rows:
                        batch = newcomers
                    elif newcomers.rows:
                        batch.join(newcomers)
            except Exception as exc:  # one bad step must not kill the server: its requests fail
                for row in [*live, *joining]:
                    _resolve(row, exc)
                batch = None
            self.running = len(batch.rows) if batch is not None else 0
            if self.on_step is not None:
                self.on_step(StepStats(len(live) + len(joining), time.perf_counter() - started))

    def _take(self, room: int, wait: bool) -> list[_Row] | None:
        """Up to `room` queued requests (waiting for one when `wait`); None when closed and idle."""
        with self._wakeup:
            while wait and not self._queue and not self._closed:
                self._wakeup.wait()
            if wait and self._closed and not self._queue:
                return None
            taken: list[_Row] = []
            while self._queue and len(taken) < room:
                row = self._queue.popleft()
                if not row.future.cancelled():
                    taken.append(row)
            return taken

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> _Batch:
        """The rows' prompts through the model in one padded pass: their first tokens and their KV cache."""
        device = self.model.device
        width = max(len(r.request.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.request.prompt_ids)) + list(r.request.prompt_ids) for r in rows],
                           device=device)
        mask = torch.tensor([[0] * (width - len(r.request.prompt_ids)) + [1] * len(r.request.prompt_ids)
                             for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        batch = _Batch(rows, cache, mask, positions[:, -1:], ids[:, -1:])
        self._decode(batch, ids, positions)
        return batch

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        self._decode(batch, batch.pending, batch.positions)

    @torch.inference_mode()
    def _decode(self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """One forward pass; each row picks its next token; rows that ended leave the batch."""
        # logits_to_keep=1: only the last column's logits are needed (a prefill's prompt columns are not).
        logits = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                            past_key_values=batch.cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1) if any(
            r.request.top_logprobs is not None for r in batch.rows) else None
        greedy = logits.argmax(dim=-1).tolist()  # one call for the whole batch; sampled rows replace theirs
        next_ids = [token if row.generator is None else self._sample(logits[i], row)
                    for i, (row, token) in enumerate(zip(batch.rows, greedy))]
        with self._tokenizer_lock:  # once per step, not once per row
            for row, token in zip(batch.rows, next_ids):
                row.text += row.detokenizer.step(self.tokenizer.backend_tokenizer, token) or ""
        keep = [i for i, (row, token) in enumerate(zip(batch.rows, next_ids))
                if not self._advance(row, token, None if logprobs is None else logprobs[i])]
        batch.pending = torch.tensor(next_ids, device=ids.device).unsqueeze(-1)
        batch.positions = batch.positions + 1
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=-1)
        batch.select(keep)

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        probs = torch.softmax(logits.float() / row.request.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int, logprobs: torch.Tensor | None) -> bool:
        """Add the row's new token (its text is in `row.text` already); answer the row and return True when it
        has ended."""
        if not row.tokens:
            row.first_token_s = time.perf_counter() - row.submitted
        row.tokens.append(token)
        eos = token == self.tokenizer.eos_token_id
        if logprobs is not None and not eos:
            row.logprobs.append(self._token_logprob(token, logprobs, row.request.top_logprobs or 0))
        full = len(row.tokens) >= row.request.max_tokens
        text = row.text
        cut = min((i for i in map(text.find, row.request.stop) if i >= 0), default=-1)
        if cut >= 0 or eos or full:
            reason = "length" if cut < 0 and not eos else "stop"
            generation = Generation(text[:cut] if cut >= 0 else text, len(row.request.prompt_ids), len(row.tokens),
                                    reason, tuple(row.logprobs), row.first_token_s)
            if row.listener is not None:
                self._send(row, generation.text, len(generation.text))
            _resolve(row, generation)
            return True
        if row.listener is not None:
            self._send(row, text, _settled(text, row.request.stop))
        return False

    def _send(self, row: _Row, text: str, settled: int) -> None:
        """Hand the listener the text settled since the last call (and the log-probabilities since then)."""
        if settled <= row.sent_chars and row.sent_logprobs == len(row.logprobs):
            return
        delta = Delta(text[row.sent_chars:settled], tuple(row.logprobs[row.sent_logprobs:]))
        row.sent_chars, row.sent_logprobs = max(settled, row.sent_chars), len(row.logprobs)
        row.listener(row.index, delta)

    def _token_logprob(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        rivals = torch.topk(logprobs, top) if top else None
        with self._tokenizer_lock:
            text = self.tokenizer.decode([token])
            named = () if rivals is None else tuple(
                (self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(rivals.values, rivals.indices))
        return TokenLogprob(text, float(logprobs[token]), named)


def _generator(request: GenerationRequest, device: torch.device) -> torch.Generator | None:
    if request.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed % 2**64)  # torch takes 0 to 2**64 - 1; negative seeds wrap
    return generator


def _settled(text: str, stops: Sequence[str]) -> int:
    """How much of `text` is final: not a tail that may still grow into a stop string. (An incomplete
    character never reaches `text`: the row's DecodeStream holds its bytes back.)"""
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return len(text) - held


def _resolve(row: _Row, outcome: Generation | BaseException) -> None:
    """Answer the row (a no-op when its caller cancelled it meanwhile) and tell its listener."""
    try:
        if isinstance(outcome, BaseException):
            row.future.set_exception(outcome)
        else:
            row.future.set_result(outcome)
    except InvalidStateError:
        return  # cancelled by its caller: nobody waits for it
    if row.listener is not None:
        row.listener(row.index, outcome)

