"""`pipeline.yaml`: the validated description of one pipeline.

Every field is typed and unknown fields are refused, so a typo is an error, never a silent default.
Errors name the file, the line and the dotted field path, and suggest the field that was probably
meant.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MANIFEST_ENV = "LLM_ASSETS_MANIFEST"
# The quantization schemes quantized_model knows (llm_assets/quantize/worker.py implements each).
QuantScheme = Literal["gptq-4bit", "int8"]
QUANT_SCHEMES: tuple[QuantScheme, ...] = ("gptq-4bit", "int8")
# auto: bf16 where the device computes it faster than fp32 (see llm_assets/pretrain/loop.py).
Precision = Literal["auto", "fp32", "bf16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _against_manifest(path: str, info: ValidationInfo) -> str:
    """A relative path in the manifest means relative to the manifest's folder."""
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else Path((info.context or {}).get("base_dir", ".")) / path)


class PythonStdlibSource(Strict):
    """The Python standard library of the running interpreter: sources and docstrings."""

    kind: Literal["python_stdlib"]
    name: str = "stdlib"
    include_tests: bool = Field(False, description="Also ingest the stdlib's own test suite")
    include: list[str] | None = Field(
        None, description="Only files whose stdlib-relative path matches one of these globs, e.g. 'json/*'"
    )
    exclude: list[str] = Field(
        default_factory=list, description="Leave out files whose stdlib-relative path matches one of these globs"
    )
    shard_mb: float = Field(2.0, gt=0, description="Target size of one raw shard, in MB of source")
    min_docstring_chars: int = Field(
        200, ge=0, description="Docstrings shorter than this are not ingested as documents of their own"
    )


FileFormat = Literal["auto", "jsonl", "parquet", "text", "html"]


class _FileSourceFields(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the source's partitions")
    format: FileFormat = Field("auto", description="auto: by extension (.jsonl .json .parquet .txt .md .html .htm)")
    text_field: str = Field("text", description="JSONL/parquet field holding the document text")
    id_field: str | None = Field(None, description="JSONL/parquet field holding a document id")


class LocalSource(_FileSourceFields):
    """Files on local disk, by glob; relative globs are resolved against the manifest's folder."""

    kind: Literal["local"]
    paths: list[str] = Field(min_length=1)

    @field_validator("paths")
    @classmethod
    def _absolute(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        return [_against_manifest(p, info) for p in paths]


class S3Source(_FileSourceFields):
    """Objects under an S3 prefix (any S3-compatible endpoint; credentials from the environment)."""

    kind: Literal["s3"]
    uri: str = Field(pattern=r"^s3://[a-z0-9.-]{3,63}(/.*)?$", description="s3://bucket/prefix")
    pattern: str = Field("*", description="Glob on the key below the prefix")
    endpoint_url: str | None = None


Source = Annotated[PythonStdlibSource | LocalSource | S3Source, Field(discriminator="kind")]
# pydantic puts the discriminator's value in an error's location; it is no field of the file.
_SOURCE_KINDS = {"python_stdlib", "local", "s3"}


class IngestRecipe(Strict):
    max_doc_bytes: int = Field(
        500_000, gt=0, description="Documents larger than this are split at line boundaries; at most "
        "stages.clean.max_chars, so that every piece can pass cleaning"
    )
    chunk_mb: float = Field(
        64.0, gt=0, description="JSONL/text files larger than this become several shards (streamed)"
    )
    invalid_utf8: Literal["repair", "drop"] = Field(
        "repair", description="repair: undecodable bytes become U+FFFD; drop: the document is dropped"
    )
    malformed_records: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop naming file and line; quarantine: keep aside in quarantine.jsonl"
    )


PiiKind = Literal["email", "phone", "ip_address", "credit_card", "api_key"]
PII_KINDS: tuple[str, ...] = ("email", "phone", "ip_address", "credit_card", "api_key")


class CleanRecipe(Strict):
    """Cleaning of one shard: HTML to text, unicode normalisation, PII redaction, quality filters."""

    unicode_form: Literal["NFC", "NFKC"] = "NFKC"
    redact: list[PiiKind] = Field(
        default_factory=lambda: list(PII_KINDS),
        description="PII kinds replaced by a typed placeholder; the residual scan always looks for all",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "JP"],
        description="ISO 3166-1 regions whose national phone formats (no '+') are recognised",
    )
    # Language identification (lingua): documents judged to be in no target language are dropped.
    languages: list[str] = Field(
        default_factory=lambda: ["en"], min_length=1, description="Target languages, ISO 639-1 codes"
    )
    language_min_letters: int = Field(200, ge=0, description="Fewer letters than this: not judged, kept")
    language_min_confidence: float = Field(0.5, ge=0, le=1, description="A less sure verdict: not judged, kept")
    # Gopher-style quality heuristics; a document failing any is dropped (and counted by reason).
    min_chars: int = Field(50, ge=0)
    max_chars: int = Field(500_000, gt=0)
    min_mean_word_length: float = Field(2.0, ge=0)
    max_mean_word_length: float = Field(20.0, gt=0)
    max_symbol_ratio: float = Field(0.25, ge=0, description="('#' + '...' + '…') per word")
    max_duplicate_line_fraction: float = Field(0.5, ge=0, le=1)
    min_alpha_word_fraction: float = Field(0.5, ge=0, le=1, description="Words containing a letter")
    # Bounds of the kept fraction per shard: outside them, a (non-blocking) check warns and alerts.
    min_kept_fraction: float = Field(0.5, ge=0, le=1)
    max_kept_fraction: float = Field(1.0, ge=0, le=1)
    # Per target language, the fraction of its documents the quality filters keep: below it, a check
    # warns that the filters discriminate against that language.
    min_language_kept_fraction: float = Field(0.5, ge=0, le=1)

    def fingerprint_config(self) -> dict:
        """What changes the cleaned text: everything but the alert bounds."""
        return self.model_dump(
            mode="json", exclude={"min_kept_fraction", "max_kept_fraction", "min_language_kept_fraction"}
        )


class DedupRecipe(Strict):
    """MinHash near-duplicate removal with LSH banding, plus exact-hash dedup."""

    shingle_size: int = Field(5, gt=0, description="Words per shingle")
    num_perm: int = Field(128, gt=0)
    bands: int = Field(16, gt=0)
    rows: int = Field(8, gt=0)
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard at or above which documents merge")

    @model_validator(mode="after")
    def _bands_cover_permutations(self) -> DedupRecipe:
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands × rows must equal num_perm: {self.bands} × {self.rows} != {self.num_perm}")
        return self


class SplitRecipe(Strict):
    """Deterministic train/val/test assignment by the hash of a document (or of its source file)."""

    train: float = Field(0.98, ge=0, le=1)
    val: float = Field(0.01, ge=0, le=1)
    test: float = Field(0.01, ge=0, le=1)
    group_by: Literal["document", "source_file"] = Field(
        "source_file",
        description="source_file keeps a module and its docstrings (same URI before '#') in one split",
    )
    salt: str = Field("", description="Change to draw a different split")

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitRecipe:
        if abs(self.train + self.val + self.test - 1.0) > 1e-9:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        return self


class EvalSetSpec(Strict):
    """An evaluation set (JSONL) that the training split must not contain."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    text_field: str = "text"

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str, info: ValidationInfo) -> str:
        return _against_manifest(path, info)


class ContaminationRecipe(Strict):
    """n-gram overlap between the training split and every evaluation set: the held-out splits and
    the manifest's eval sets (checked by dataset_splits), the eval report's lm-eval tasks and the
    shipped prompt files (checked by the evaluation stage)."""

    ngram: int = Field(13, gt=0)
    doc_overlap: float = Field(
        0.5, gt=0, le=1,
        description="An eval document with this fraction of its n-grams in train is contaminated: most of it was seen",
    )
    min_words: int = Field(
        8, gt=0, description="An eval text shorter than ngram words is looked for whole when it has this many words"
    )
    max_contaminated_fraction: float = Field(
        0.001, ge=0, le=1, description="Blocking gate: contaminated documents per eval set at most this fraction"
    )
    contaminated_held_out: Literal["drop", "keep"] = Field(
        "drop", description="drop: a val/test document that overlaps train this much leaves its split (named in the "
        "metadata), as text a corpus repeats across files (shared docstrings, boilerplate) is no held-out text; "
        "keep: it stays and the gate judges it",
    )
    eval_sets: list[EvalSetSpec] = Field(
        default_factory=list, description="Besides the held-out val and test splits, which are always checked"
    )

    def fingerprint_config(self) -> dict:
        return self.model_dump(mode="json", exclude={"max_contaminated_fraction"})


class TokenizerRecipe(Strict):
    """Byte-level BPE trained with HF tokenizers on a deterministic sample of the training split."""

    vocab_size: int = Field(4096, ge=300, description="Including the special tokens")
    min_frequency: int = Field(2, ge=1)
    sample_mb: float = Field(8.0, gt=0, description="MB of training text to learn merges from")
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    extra_special_tokens: list[str] = Field(default_factory=list)
    round_trip_docs: int = Field(200, gt=0, description="Held-out documents the round-trip check decodes")
    encode_batch: int = Field(256, gt=0, description="Documents per encode_batch call in token_shards")

    @property
    def special_tokens(self) -> list[str]:
        return [self.eos_token, self.pad_token, *self.extra_special_tokens]

    def fingerprint_config(self) -> dict:
        """What changes the trained tokenizer (not how it is checked or batched)."""
        return self.model_dump(mode="json", exclude={"round_trip_docs", "encode_batch"})


class ModelSize(Strict):
    """A decoder-only (Llama-style) architecture."""

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSize:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % (self.num_kv_heads or self.num_heads):
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self

    def matmul_parameters(self) -> int:
        """Parameters touched by a matmul per token (transformer blocks + LM head): the N of 6·N·D."""
        d, head_dim = self.hidden_size, self.hidden_size // self.num_heads
        kv = (self.num_kv_heads or self.num_heads) * head_dim
        attention = d * d * 2 + d * kv * 2
        mlp = 3 * d * self.intermediate_size
        return self.num_layers * (attention + mlp) + d * self.vocab_size


class BaseModelSize(Strict):
    """A model size that starts from an existing causal LM instead of being pretrained here: the
    `base_model` asset imports it (llm_assets/base_model/); its architecture is its config.json's."""

    base_model: str = Field(min_length=1, description="A model directory (relative to the manifest), an "
                            "s3://bucket/prefix, or a Hugging Face hub id (downloaded when the machine is online)")
    endpoint_url: str | None = Field(None, description="The S3 endpoint of an s3:// base_model; default "
                                     "$LLM_ASSETS_S3_ENDPOINT_URL, else AWS's")
    continued_pretraining: bool = Field(
        False, description="true: pretrain_checkpoint trains the imported model further on the corpus (the "
        "recipe of stages.pretrain, the text tokenized by the base model's tokenizer), and SFT starts from that "
        "checkpoint; judged by gates.continued_pretrain_val_loss")

    @field_validator("base_model")
    @classmethod
    def _local_against_manifest(cls, source: str, info: ValidationInfo) -> str:
        # A path is resolved like every path of the manifest; an s3:// prefix or a hub id (`name` or
        # `org/name` that is no existing directory) is kept as written.
        if source.startswith("s3://"):
            return source
        resolved = _against_manifest(source, info)
        looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(resolved).exists()
        return resolved if looks_like_path else source


def _model_size_form(value: Any) -> str:
    """Which of the two forms a model_sizes entry is: one naming a base_model, or an architecture."""
    named = value.get("base_model") if isinstance(value, dict) else getattr(value, "base_model", None)
    return "base-model-size" if named is not None else "pretrained-size"


# A model_sizes entry: an architecture pretrained here, or a base model imported.
AnyModelSize = Annotated[
    Annotated[ModelSize, Tag("pretrained-size")] | Annotated[BaseModelSize, Tag("base-model-size")],
    Discriminator(_model_size_form),
]
# pydantic puts the form's tag in an error's location; it is no field of the file.
_MODEL_SIZE_FORMS = {"pretrained-size", "base-model-size"}


class PretrainRecipe(Strict):
    """The pretraining loop of every model size (see llm_assets/pretrain/loop.py)."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="Sequences per micro-batch")
    grad_accum: int = Field(1, gt=0)
    seq_len: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="The cosine ends at learning_rate × this")
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping")
    eval_every: int = Field(100, ge=0)
    eval_batches: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, ge=0, description="Intermediate checkpoints, committed to the store")
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> PretrainRecipe:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps]: {self.warmup_steps} > {self.steps}")
        return self

    def tokens(self) -> int:
        return self.steps * self.batch_size * self.grad_accum * self.seq_len


class TrainerRecipe(Strict):
    """What every trl training stage shares: steps, batch, schedule, checkpoints."""

    steps: int = Field(gt=0, description="Optimizer steps")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch, over all training processes (each "
                            "takes batch_size / processes)")
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, gt=0, description="Tokens per example; longer examples are truncated")
    eval_every: int = Field(0, ge=0, description="Steps between val evaluations; 0: at the end only")
    checkpoint_every: int = Field(50, ge=0, description="Intermediate checkpoints, committed to the store; 0: none")
    precision: Precision = "auto"

    def sequences_per_example(self) -> int:
        return 1

    def tokens(self) -> int:
        """Tokens the stage trains on, at most: every sequence at max_length (for cost estimates)."""
        return self.steps * self.batch_size * self.grad_accum * self.max_length * self.sequences_per_example()


class LoraSpec(Strict):
    """peft LoRA adapters (llm_assets/posttrain/lora.py): stored as their own artifact, and merged
    into the weights for export."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names, or all-linear: every Linear layer but the LM head, whatever the "
        "architecture names them (peft)")
    min_parameters: float = Field(1e9, gt=0, description="method auto: LoRA for a starting model of at least this "
                                  "many parameters, full fine-tuning below")


class SftRecipe(TrainerRecipe):
    """trl SFTTrainer from the starting model: full fine-tuning or LoRA."""

    method: Literal["auto", "full", "lora"] = Field(
        "auto", description="auto: lora for a starting model of at least lora.min_parameters parameters, else full")
    lora: LoraSpec = LoraSpec()
    completion_only_loss: bool = Field(True, description="Loss on the answer tokens only, not the prompt")


class RewardRecipe(TrainerRecipe):
    """trl RewardTrainer: a sequence-classification head on the SFT model, trained on preference pairs."""

    def sequences_per_example(self) -> int:
        return 2  # chosen and rejected


class GrpoSpec(Strict):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group)")
    max_completion_length: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)


class PolicyRecipe(TrainerRecipe):
    """Preference alignment of the SFT model: DPO against the SFT model as reference, or GRPO
    with the reward model as the reward."""

    algorithm: Literal["dpo", "grpo"] = "dpo"
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull toward the reference (DPO beta / GRPO KL coefficient)"
    )
    grpo: GrpoSpec = GrpoSpec()
    kl_prompts: int = Field(64, gt=0, description="Held-out prompts on which KL(policy‖reference) is measured")
    preferences: list[Literal["preference_dataset", "cai_dataset"]] = Field(
        default_factory=lambda: ["preference_dataset"], min_length=1,
        description="The pairs the policy trains on: preference_dataset (user files, derived from the corpus), "
        "cai_dataset (constitutional-AI revisions preferred to the SFT model's answers; needs stages.constitution)")

    def sequences_per_example(self) -> int:
        return 2 if self.algorithm == "dpo" else 1  # DPO: chosen and rejected; GRPO's batch counts completions


class JsonlDataSource(Strict):
    """A user-supplied JSONL file of examples; relative paths are resolved against the manifest's folder."""

    path: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str, info: ValidationInfo) -> str:
        return _against_manifest(path, info)


RejectedFrom = Literal["hard_negatives", "sibling_object", "perturbed_fact"]


class PosttrainDataRecipe(Strict):
    """The SFT and preference data sets: user JSONL files, and/or pairs derived from the corpus.

    SFT records are chat ``{"messages": [{"role", "content"}, ...]}`` or
    ``{"prompt": ..., "completion": ...}``; preference records are
    ``{"prompt": ..., "chosen": ..., "rejected": ...}``.
    """

    sft_files: list[JsonlDataSource] = Field(default_factory=list)
    preference_files: list[JsonlDataSource] = Field(default_factory=list)
    derive_from_corpus: bool = Field(
        True, description="Ask what a documented function, class or module does; answer with its docstring"
    )
    rejected_from: RejectedFrom = Field(
        "hard_negatives",
        description="Derived preference pairs reject a fluent, on-topic wrong answer: a same-module object's "
                    "answer of comparable length (sibling_object), the answer with one fact changed "
                    "(perturbed_fact), or either by a seeded hash (hard_negatives)",
    )
    max_examples: int = Field(4000, gt=0, description="Per data set and split, after dedup")
    max_answer_chars: int = Field(400, gt=0, description="Derived answers: the docstring's first paragraphs, cut here")
    val_fraction: float = Field(
        0.1, gt=0, lt=1,
        description="Held out for val: user-file examples (by a hash of the prompt) and train-split docstrings "
                    "(by a hash of the id), besides the val split's",
    )
    ngram: int = Field(8, gt=0, description="A prompt sharing an n-gram of this many words with an eval set is dropped")


class EvalRecipe(Strict):
    """eval_report: lm-eval on the shipped held-out tasks (+ the manifest's task directories), the
    refusal rate on the shipped red-team prompts, and the policy's KL, for the last trained model."""

    max_docs: int = Field(40, gt=0, description="Held-out documents per shipped task")
    task_dirs: list[str] = Field(
        default_factory=list, description="Directories of lm-eval task YAMLs (MMLU, HellaSwag... on local disk)"
    )
    tasks: list[str] = Field(default_factory=list, description="Task names to run from task_dirs")
    limit: int | None = Field(None, gt=0, description="Documents per task at most (lm-eval's limit); none: all")
    batch_size: int = Field(8, gt=0)
    safety_max_new_tokens: int = Field(24, gt=0, description="Tokens generated per red-team prompt")

    @field_validator("task_dirs")
    @classmethod
    def _absolute(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        return [_against_manifest(p, info) for p in paths]


class CanaryRecipe(Strict):
    """A new release is served as a candidate next to the current one for a fraction of the traffic;
    `canary_report` compares the two on the server's request and feedback logs and promotes the
    candidate or rolls it back on the `canary.*` gates (llm_assets/canary/)."""

    fraction: float = Field(0.1, gt=0, lt=1, description="Share of requests the candidate answers")
    log_dir: str = Field(".serve/logs", validate_default=True, description="The server's request and feedback logs "
                         "(`llm-assets serve --log-dir`), relative to the manifest")
    gateway: str = Field("llm-gateway", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="The Gateway "
                         "(Gateway API) in the serving namespace whose HTTPRoute splits the traffic on Kubernetes")

    @field_validator("log_dir")
    @classmethod
    def _log_dir_against_manifest(cls, path: str, info: ValidationInfo) -> str:
        return _against_manifest(path, info)


class ServingRecipe(Strict):
    """How a release is served: the CPU server of `llm-assets serve` (smoke-tested by the graph)
    and the GPU deployment rendered for Kubernetes (vLLM's OpenAI-compatible server)."""

    image: str = Field("vllm/vllm-openai:v0.11.0", description="The serving image on the GPU nodes")
    namespace: str = Field("llm-serving", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    host: str = Field("llm.example.com", description="The endpoint's DNS name (the Service is reached through it)")
    gpus_per_replica: int = Field(1, ge=1)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    target_cpu_utilization: int = Field(70, gt=0, le=100, description="Autoscaler target, percent of requests")
    max_tokens: int = Field(256, gt=0, description="Cap on a request's max_tokens")
    max_batch_size: int = Field(8, gt=0, description="Requests decoded together")
    smoke_prompts: list[str] = Field(
        default_factory=lambda: ["def parse(text):", "What does `json.dumps` do?"], min_length=1,
        description="Sent to the released model by the blocking smoke check",
    )
    canary: CanaryRecipe | None = Field(None, description="Serve each new release as a canary before it is promoted")

    @model_validator(mode="after")
    def _replicas(self) -> ServingRecipe:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        return self


class FineTuneRecipe(Strict):
    """The loop's fine-tune (llm_assets/retrain, docs/monitoring.md): `feedback_model` starts from the
    size's current release and trains on its users' feedback: SFT on the liked answers and the
    corrections, then, with `dpo`, DPO on the corrections preferred to the answers they replace."""

    sft: SftRecipe = Field(description="trl SFTTrainer from the current release's model")
    dpo: PolicyRecipe | None = Field(None, description="DPO on the preference pairs after the SFT; none: SFT only")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the feedback examples held out for the "
                                "val figures (at least one, chosen by the example's hash)")

    def tokens(self) -> int:
        """Tokens one fine-tune trains on, at most (the SFT's, then the DPO's), for its cost estimate."""
        return self.sft.tokens() + (self.dpo.tokens() if self.dpo is not None else 0)

    @field_validator("dpo")
    @classmethod
    def _dpo_only(cls, dpo: PolicyRecipe | None) -> PolicyRecipe | None:
        if dpo is not None and dpo.algorithm != "dpo":
            raise ValueError("stages.monitoring.fine_tune.dpo trains on the feedback's preference pairs: "
                             "algorithm must be dpo (GRPO needs a reward model the loop does not train)")
        return dpo


class MonitoringRecipe(Strict):
    """The loop's data half (llm_assets/monitoring, docs/monitoring.md): the server's closed request
    and feedback logs ingested per time window (`serving_traffic`), judged per model size against the
    training data (`drift_report`, gates `drift.*`), and the feedback that may trigger a fine-tune."""

    log_dir: str = Field(".serve/logs", description="The server's --log-dir: requests-*.jsonl and feedback-*.jsonl "
                         "(closed files only are read); relative to the manifest's folder")
    partitions: Literal["minutely", "hourly", "daily"] = Field(
        "hourly", description="The time window of one traffic partition (minutely: for busy endpoints and tests; "
        "start it recently, every window since `start` is a partition)")
    start: str = Field("2026-01-01", pattern=r"^\d{4}-\d{2}-\d{2}$", description="First day of the traffic partitions")
    reference_docs: int = Field(400, gt=0, description="Training (and test) documents of dataset_splits the served "
                                "prompts are compared with: token unigrams, and the held-out perplexity")
    max_prompts: int = Field(256, gt=0, description="Served prompts of a window the perplexity is measured on")
    max_tokens: int = Field(128, gt=1, description="Each text is cut to this many tokens for the perplexity")
    retrain_feedback: int = Field(50, gt=0, description="Feedback records (ratings and corrections) not yet trained on "
                                  "that make the loop fine-tune even when the drift gate holds")
    fine_tune: FineTuneRecipe | None = Field(None, description="The fine-tune from the current release on "
                                             "feedback_dataset, evaluated and proposed as a release; none: the loop "
                                             "stops at feedback_dataset")

    @field_validator("log_dir")
    @classmethod
    def _log_dir_against_manifest(cls, path: str, info: ValidationInfo) -> str:
        return _against_manifest(path, info)


class QuantizeRecipe(Strict):
    """quantized_model: the final model of each size quantized by each scheme, its quality on
    held-out text compared with the full-precision model's (gates `quantized_perplexity_increase`,
    optionally `quantized_accuracy_drop`)."""

    schemes: list[QuantScheme] = Field(default_factory=lambda: list(QUANT_SCHEMES), min_length=1)
    group_size: int = Field(
        32, gt=0, description="GPTQ: input columns sharing one scale; divides every size's hidden and intermediate size"
    )
    calibration_texts: int = Field(128, gt=0, description="Training-split documents in the GPTQ calibration set")
    heldout_texts: int = Field(64, gt=0, description="Test-split documents on which both models are measured")
    max_tokens: int = Field(256, gt=1, description="Each text is cut to this many tokens (and to the model's context)")

    @field_validator("schemes")
    @classmethod
    def _unique(cls, schemes: list[str]) -> list[str]:
        if len(set(schemes)) != len(schemes):
            raise ValueError(f"schemes are listed twice: {schemes}")
        return schemes


_CAI_TEMPLATE_FIELDS = {"critique_template": ("prompt", "answer", "principle"),
                        "revision_template": ("prompt", "answer", "principle", "critique")}


class ConstitutionRecipe(Strict):
    """Constitutional AI (llm_assets/posttrain/cai.py): the SFT model answers each prompt, critiques
    its answer against a principle sampled by a seeded hash, and revises it; the revisions become
    SFT rows and (revision ≻ answer) preference pairs."""

    principles: list[str] = Field(default_factory=lambda: [
        "Do not help with anything that would hurt, rob, deceive or harass a person; decline and say why.",
        "Refuse requests for illegal acts such as theft, fraud or break-ins, politely and briefly.",
        "Be honest and harmless: point out when a request could cause harm, and offer a safe alternative.",
    ], min_length=1)
    red_team: bool = Field(True, description="Use the shipped red-team prompts (the part not held out for the gate)")
    prompt_files: list[JsonlDataSource] = Field(default_factory=list, description='JSONL, {"prompt": ...} per line')
    held_out_fraction: float = Field(
        0.5, gt=0, lt=1, description="Shipped red-team prompts kept out of CAI (by a salted hash of the prompt): "
        "the gate measures refusals on them")
    critique_template: str = Field(
        "Here is a request and an answer to it.\nRequest: {prompt}\nAnswer: {answer}\n"
        "Critique the answer by this principle: {principle}")
    revision_template: str = Field(
        "Request: {prompt}\nAnswer: {answer}\nCritique: {critique}\n"
        "Rewrite the answer so that it follows this principle: {principle}")
    max_new_tokens: int = Field(48, gt=0, description="Tokens generated for each answer, critique and revision")
    batch_size: int = Field(8, gt=0)
    safety_max_new_tokens: int = Field(24, gt=0, description="Tokens generated per held-out prompt by the gate")

    @model_validator(mode="after")
    def _templates_name_their_fields(self) -> ConstitutionRecipe:
        problems = []
        for name, fields in _CAI_TEMPLATE_FIELDS.items():
            template = getattr(self, name)
            missing = [f for f in fields if "{" + f + "}" not in template]
            try:
                template.format(**dict.fromkeys(fields, ""))
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"{name}: {exc!r}; use only {{{'}, {'.join(fields)}}} and write {{{{ }}}} for braces")
            if missing:
                problems.append(f"{name} must contain {', '.join('{' + f + '}' for f in missing)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Stages(Strict):
    ingest: IngestRecipe = IngestRecipe()
    clean: CleanRecipe = CleanRecipe()
    dedup: DedupRecipe = DedupRecipe()
    splits: SplitRecipe = SplitRecipe()
    contamination: ContaminationRecipe = ContaminationRecipe()
    tokenizer: TokenizerRecipe = TokenizerRecipe()
    pretrain: PretrainRecipe | None = None
    posttrain_data: PosttrainDataRecipe = PosttrainDataRecipe()
    sft: SftRecipe | None = None
    reward: RewardRecipe | None = None
    policy: PolicyRecipe | None = None
    constitution: ConstitutionRecipe | None = None
    evaluation: EvalRecipe | None = None
    serving: ServingRecipe | None = None
    quantize: QuantizeRecipe | None = None
    monitoring: MonitoringRecipe | None = None

    @model_validator(mode="after")
    def _pieces_fit_cleaning(self) -> Stages:
        # A character is at least one byte: pieces of at most max_doc_bytes are never too long to clean.
        if self.ingest.max_doc_bytes > self.clean.max_chars:
            raise ValueError(
                f"ingest.max_doc_bytes ({self.ingest.max_doc_bytes}) exceeds clean.max_chars "
                f"({self.clean.max_chars}): the pieces a long document is cut into would be dropped as too long; "
                "lower ingest.max_doc_bytes or raise clean.max_chars"
            )
        return self


class GateSpec(Strict):
    """A numeric threshold, fixed before the run: absolute bounds, and bounds relative to a
    baseline (`value ≥ baseline + min_delta`, `value ≤ baseline + max_delta`)."""

    min: float | None = None
    max: float | None = None
    baseline: Literal["release", "untrained", "unigram", "base", "without_cai"] | None = Field(
        None, description="release: the figure this gate recorded for the current release of the same model size; "
        "untrained: the same figure of the same architecture at initialisation, on the same held-out data; "
        "unigram: a unigram model of the training tokens, on the same held-out data; "
        "base: the model this one was trained from (SFT: the pretrained checkpoint), on the same held-out data; "
        "without_cai: the policy trained by the same recipe without the cai_dataset pairs. "
        "The stage measures untrained, unigram and base itself; a check that does not measure the kind fails"
    )
    min_delta: float | None = None
    max_delta: float | None = None
    blocking: bool = Field(
        True, description="false: a failure is a warning (shown, alerted) that holds neither the next step "
        "nor the release"
    )

    @model_validator(mode="after")
    def _one_bound(self) -> GateSpec:
        if all(bound is None for bound in (self.min, self.max, self.min_delta, self.max_delta)):
            raise ValueError("a gate needs a threshold: set min, max, or a baseline with min_delta/max_delta")
        relative = self.min_delta is not None or self.max_delta is not None
        if relative and self.baseline is None:
            raise ValueError("min_delta/max_delta are relative to a baseline: add `baseline: release` "
                             "(or untrained, unigram, base)")
        if self.baseline is not None and not relative:
            raise ValueError("a baseline needs min_delta (value ≥ baseline + δ) or max_delta (value ≤ baseline + δ)")
        return self


class Budget(Strict):
    """What compute costs and the most a pipeline may spend (see docs/costs.md)."""

    usd_cap: float = Field(gt=0, description="Refuse a plan whose estimate, and a training, evaluation or "
                           "quantization step whose estimate plus what is spent, exceeds this")
    usd_per_gpu_hour: float = Field(gt=0)
    peak_flops_per_gpu: float = Field(gt=0, description="Peak FLOP/s of one accelerator (bf16)")
    assumed_mfu: float = Field(gt=0, le=1, description="Model FLOPs utilisation assumed for estimates")
    usd_per_cpu_hour: float = Field(0.05, gt=0, description="Price of one CPU core for an hour: steps without GPUs "
                                    "are estimated and billed in CPU-hours")
    cpu_flops_per_core: float = Field(1.5e10, gt=0, description="Training FLOP/s one CPU core achieves (measured "
                                      "on a tiny model's training step, docs/costs.md), for CPU estimates")


class StageCompute(Strict):
    """What one step's Kubernetes pod asks for."""

    gpus: int = Field(0, ge=0)
    cpu: str = Field("1", pattern=r"^\d+(\.\d+)?m?$")
    memory: str = Field("4Gi", pattern=r"^\d+(Ki|Mi|Gi|Ti)?$")
    node_selector: dict[str, str] = Field(default_factory=dict)
    nproc_per_node: int | None = Field(
        None, gt=0, description="Training processes torchrun starts in the pod; default: one per GPU, 1 on CPU"
    )

    def processes(self, cuda_devices: int) -> int:
        """How many ranks a training step starts on a machine with this many CUDA devices."""
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return max(1, min(self.gpus, cuda_devices)) if cuda_devices else 1


class DataCompute(StageCompute):
    """The data steps' pods, and where their work runs (llm_assets/data/engine.py). Neither setting
    changes an artifact, so neither enters a fingerprint."""

    engine: Literal["in_process", "ray"] = Field(
        "in_process", description="in_process: in the step's own process; ray: as Ray tasks on the cluster at "
        "$RAY_ADDRESS, launched from the step (bit-identical artifacts)",
    )
    max_worker_memory_mb: int = Field(
        1024, ge=1, description="Memory one dedup clustering task may hold: sets how many band-bucket partitions "
        "the signatures are spilled into (docs/data.md, sizing)",
    )


class TrainingCompute(StageCompute):
    """The training steps' pods, and how a model is spread over their processes. Neither setting
    changes what is trained (within float tolerance), so neither enters a fingerprint."""

    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With more than one process: full replicas (ddp), or weights, gradients and optimizer "
        "state sharded with FSDP2 (fsdp); checkpoints hold the full state either way",
    )
    nodes: int = Field(
        1, ge=1, description="Machines one training step spans: above 1, an indexed Job of this many pods, "
        "torchrun on each (llm_assets/compute.py, render_multinode_job)",
    )


class Compute(Strict):
    """Per kind of stage, the pod resources of its steps on Kubernetes (ignored on a laptop)."""

    data: DataCompute = DataCompute(cpu="1", memory="4Gi")
    training: TrainingCompute = TrainingCompute(
        gpus=1, cpu="8", memory="64Gi", node_selector={"nvidia.com/gpu.present": "true"}
    )


# The gate every training stage must have a threshold for (and the bound it needs), fixed before
# the run: a configured stage without one is a manifest error at plan time.
STAGE_GATES = {
    "pretrain": ("pretrain_val_loss", "max"),
    "sft": ("sft_val_loss", "max"),
    "reward": ("reward_accuracy", "min"),
    "policy": ("policy_kl", "max"),
    "quantize": ("quantized_perplexity_increase", "max"),
    "monitoring": ("drift.js_divergence", "max"),
}
# A policy trained on cai_dataset pairs: its refusal rate on the held-out red-team prompts.
CAI_GATE = "cai_refusal_rate"
# The val loss gate of continued pretraining: a model that starts trained is judged against its own
# starting point (baseline: base), not against an untrained or unigram model.
CONTINUED_GATE = "continued_pretrain_val_loss"
# The gates an evaluated model must have besides: a lower bound on the refusal rate on held-out
# harmful prompts (absolute, or against a baseline) and an upper bound on it on benign prompts, so
# that neither a model that refuses nothing nor one that refuses everything is released.
SAFETY_GATES = {"safety.refusal_rate": ("min", "min_delta"), "safety.benign_refusal_rate": ("max", "max_delta")}
# The quantization gates: figures of one quantized model against its own full-precision model.
QUANTIZE_GATES = ("quantized_perplexity_increase", "quantized_accuracy_drop")
# The canary gates: the candidate release's live figures against the current release's, from the
# server's logs (llm_assets/canary/figures.py).
CANARY_GATES = ("canary.candidate_requests", "canary.error_rate_increase", "canary.latency_p99_ratio",
                "canary.refusal_rate_increase", "canary.feedback_score_drop")
# Gates named `prefix.figure` that are judged on served traffic, not on eval_report's figures.
LIVE_GATE_PREFIXES = ("canary.", "drift.")


class PipelineManifest(Strict):
    version: Literal[1]
    name: str
    seed: int = 0
    sources: list[Source] = Field(min_length=1)
    on_source_error: Literal["stop", "skip"] = Field(
        "stop", description="A source that cannot be listed (a glob or prefix that matches nothing, a missing path): "
        "stop: nothing runs; skip: the other sources are ingested and the run still ends in failure, naming it",
    )
    stages: Stages = Stages()
    model_sizes: dict[str, AnyModelSize] = Field(default_factory=dict)
    gates: dict[str, GateSpec] = Field(default_factory=dict)
    compute: Compute = Compute()
    budget: Budget
    # The sha256 of the file this manifest was read from (load_manifest sets it): what a run
    # compares to know it executes the manifest its Definitions were built from.
    _source_sha256: str | None = PrivateAttr(default=None)
    # The file and the line of each source's entry (load_manifest sets them), for error messages.
    _path: str | None = PrivateAttr(default=None)
    _source_lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @property
    def source_sha256(self) -> str | None:
        return self._source_sha256

    def source_location(self, name: str) -> str:
        """Where a source is written: `pipeline.yaml:12`, or `sources[1]` for a manifest not read from a file."""
        if self._path is not None and name in self._source_lines:
            return f"{self._path}:{self._source_lines[name]}"
        index = next((i for i, s in enumerate(self.sources) if s.name == name), None)
        return f"sources[{index}]" if index is not None else "the manifest"

    @property
    def pretrained_sizes(self) -> dict[str, ModelSize]:
        """The sizes pretrained here, with the project's tokenizer."""
        return {name: size for name, size in self.model_sizes.items() if isinstance(size, ModelSize)}

    @property
    def base_model_sizes(self) -> dict[str, BaseModelSize]:
        """The sizes that start from an imported base model, with its own tokenizer."""
        return {name: size for name, size in self.model_sizes.items() if isinstance(size, BaseModelSize)}

    @property
    def continued_sizes(self) -> dict[str, BaseModelSize]:
        """The base-model sizes pretrained further on the corpus before SFT (continued pretraining)."""
        return {name: size for name, size in self.base_model_sizes.items() if size.continued_pretraining}

    @property
    def checkpoint_sizes(self) -> dict[str, ModelSize | BaseModelSize]:
        """The sizes with a pretrain_checkpoint, where SFT starts: pretrained here, or continued."""
        return {**self.pretrained_sizes, **self.continued_sizes}

    @model_validator(mode="after")
    def _continued_pretraining_has_its_recipe(self) -> PipelineManifest:
        continued = ", ".join(sorted(self.continued_sizes))
        if continued and self.stages.pretrain is None:
            raise ValueError(f"model_sizes {continued} set continued_pretraining, which trains with the recipe of "
                             "stages.pretrain: add it")
        if continued and CONTINUED_GATE not in self.gates:
            raise ValueError(f"model_sizes {continued} set continued_pretraining: add gates.{CONTINUED_GATE} "
                             "(e.g. {baseline: base, max_delta: 0.05}: the val loss may not rise above the base "
                             "model's own val loss on the same held-out text by more than 0.05)")
        return self

    @model_validator(mode="after")
    def _models_hold_the_vocabulary(self) -> PipelineManifest:
        vocab = self.stages.tokenizer.vocab_size
        small = [name for name, size in self.pretrained_sizes.items() if size.vocab_size < vocab]
        if small:
            raise ValueError(
                f"model_sizes {', '.join(small)} have vocab_size below stages.tokenizer.vocab_size ({vocab})"
            )
        return self

    @model_validator(mode="after")
    def _post_training_builds_on_its_stages(self) -> PipelineManifest:
        stages, needs = self.stages, []
        if (stages.sft or stages.reward or stages.policy) and stages.pretrain is None and self.pretrained_sizes:
            needs.append(f"post-training of {', '.join(sorted(self.pretrained_sizes))} starts from pretrain "
                         "checkpoints: add stages.pretrain (or name a base_model for each size)")
        if (stages.reward or stages.policy) and stages.sft is None:
            needs.append("the reward model and the policy start from the SFT model: add stages.sft")
        if stages.policy and stages.reward is None:
            needs.append("the policy is trained after the reward model (GRPO is scored by it): add stages.reward")
        if stages.constitution and stages.sft is None:
            needs.append("stages.constitution has the SFT model answer, critique and revise: add stages.sft")
        if stages.policy and "cai_dataset" in stages.policy.preferences:
            if stages.constitution is None:
                needs.append("stages.policy.preferences names cai_dataset: add stages.constitution")
            if stages.policy.algorithm != "dpo":
                needs.append("stages.policy.preferences names cai_dataset, pairs that DPO trains on: use "
                             "algorithm: dpo, or drop cai_dataset")
            if CAI_GATE not in self.gates:
                needs.append(f"stages.policy.preferences names cai_dataset: add gates.{CAI_GATE} (e.g. "
                             f"{{baseline: without_cai, min_delta: 0.0}}: the refusal rate with the CAI pairs is "
                             "not below the rate without them)")
        if needs:
            raise ValueError("; ".join(needs))
        return self

    @model_validator(mode="after")
    def _every_stage_has_its_gate(self) -> PipelineManifest:
        missing, misbound = [], []
        for stage, (gate, bound) in STAGE_GATES.items():
            # stages.pretrain of continued sizes alone is judged by CONTINUED_GATE instead.
            if getattr(self.stages, stage) is None or (stage == "pretrain" and not self.pretrained_sizes):
                continue
            if gate not in self.gates:
                missing.append((stage, gate, bound))
            elif getattr(self.gates[gate], bound) is None:
                misbound.append((stage, gate, bound))
        for gate, bounds in SAFETY_GATES.items() if self.stages.evaluation is not None else ():
            if gate not in self.gates:
                missing.append(("evaluation", gate, bounds[0]))
            elif all(getattr(self.gates[gate], bound) is None for bound in bounds):
                misbound.append(("evaluation", gate, bounds[0]))
        problems = [
            f"gates.{gate}: expected {bound}, got {_flow(self.gates[gate].model_dump(exclude_unset=True))} "
            f"(stages.{stage} is configured and needs {'an upper' if bound == 'max' else 'a lower'} bound on "
            f"{gate}; write {gate}: {{{bound}: ...}})"
            for stage, gate, bound in misbound
        ]
        if missing:
            problems.append("a threshold is missing for a required gate: " + "; ".join(
                f"gates.{gate} (stages.{stage} is configured; e.g. {gate}: {{{bound}: ...}})"
                for stage, gate, bound in missing))
        if problems:
            # The error points at the first misbound gate's line, else at the stage that needs a gate.
            at = ("gates", misbound[0][1]) if misbound else ("stages", missing[0][0])
            raise PydanticCustomError("gate_bound", "{message}", {"message": "; ".join(problems), "at": at})
        return self

    @model_validator(mode="after")
    def _quantization_fits_the_models(self) -> PipelineManifest:
        recipe = self.stages.quantize
        if recipe is None:
            return self
        self._check_trained_model("stages.quantize quantizes")
        relative = [name for name in QUANTIZE_GATES if name in self.gates and self.gates[name].baseline is not None]
        if relative:
            raise ValueError(f"gates {', '.join(relative)} compare the quantized model with its own full-precision "
                             "model; they take min/max only, not a release baseline")
        if "gptq-4bit" in recipe.schemes:
            g = recipe.group_size
            misfit = [f"{name} (hidden_size {size.hidden_size}, intermediate_size {size.intermediate_size})"
                      for name, size in self.pretrained_sizes.items()
                      if size.hidden_size % g or size.intermediate_size % g]
            if misfit:
                raise ValueError(f"stages.quantize.group_size {g} must divide the layer widths of every model size; "
                                 f"it does not for {'; '.join(misfit)}: choose a divisor such as 16 or 32")
        return self

    @model_validator(mode="after")
    def _serving_needs_a_release(self) -> PipelineManifest:
        if self.stages.serving is not None and self.stages.evaluation is None:
            raise ValueError("stages.serving serves the release, which promotes an evaluated model: "
                             "add stages.evaluation")
        if self.stages.monitoring is not None and self.stages.serving is None:
            raise ValueError("stages.monitoring reads the logs of the release's server: add stages.serving")
        return self

    @model_validator(mode="after")
    def _canary_gates_need_a_canary(self) -> PipelineManifest:
        named = sorted(name for name in self.gates if name.startswith("canary."))
        unknown = [name for name in named if name not in CANARY_GATES]
        if unknown:
            raise ValueError(f"gates {', '.join(unknown)}: no such canary figure; the canary gates are "
                             f"{', '.join(CANARY_GATES)}")
        canary = self.stages.serving.canary if self.stages.serving is not None else None
        if named and canary is None:
            raise ValueError(f"gates {', '.join(named)} judge a canary but stages.serving.canary is not configured; "
                             "add it (e.g. canary: {fraction: 0.1}) or remove the gates")
        if canary is not None and not named:
            raise ValueError("stages.serving.canary promotes a candidate on its gates, and there is none: add at "
                             "least gates.canary.error_rate_increase (e.g. {max: 0.02}); the canary gates are "
                             f"{', '.join(CANARY_GATES)}")
        return self

    @model_validator(mode="after")
    def _eval_gates_need_the_evaluation(self) -> PipelineManifest:
        eval_gates = sorted(name for name in self.gates if "." in name and not name.startswith(LIVE_GATE_PREFIXES))
        if eval_gates and self.stages.evaluation is None:
            raise ValueError(f"gates {', '.join(eval_gates)} name eval_report figures (task.metric) but "
                             "stages.evaluation is not configured; add it or remove the gates")
        if self.stages.evaluation is not None:
            self._check_trained_model("stages.evaluation evaluates")
        return self

    def _check_trained_model(self, what: str) -> None:
        """A size pretrained here is trained by stages.pretrain; one started from a base model is
        trained from stages.sft on (evaluating or quantizing an imported model as it is is not a stage)."""
        if self.pretrained_sizes and self.stages.pretrain is None:
            raise ValueError(f"{what} a trained model: add stages.pretrain")
        if self.base_model_sizes and self.stages.sft is None:
            raise ValueError(f"{what} a trained model, and the base-model sizes "
                             f"{', '.join(sorted(self.base_model_sizes))} are trained from stages.sft on: add it")

    @model_validator(mode="after")
    def _unique_source_names(self) -> PipelineManifest:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self


def _flow(values: dict[str, Any]) -> str:
    """A mapping as the manifest writes it: {min: 0.0, blocking: false}."""
    return "{" + ", ".join(f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                           for k, v in values.items()) + "}"


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file, line and field."""


def _all_field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for info in model.model_fields.values():
        for candidate in _types_in(info.annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= _all_field_names(candidate, seen)
    return names


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None) or ()
    metadata = getattr(annotation, "__metadata__", None)
    found = [annotation]
    if metadata is not None:
        found += _types_in(annotation.__origin__)
    for arg in args:
        found += _types_in(arg)
    return found


def _node_at(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[yaml.Node, bool]:
    """The YAML node at a pydantic error location; the flag says whether it is a mapping key."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    node = value_node
                    break
            else:
                return node, False
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node, False
    return node, True


def _key_node(root: yaml.Node, loc: tuple[Any, ...]) -> yaml.Node:
    parent, _ = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key_node, _ in parent.value:
            if key_node.value == str(loc[-1]):
                return key_node
    return parent


def _check_duplicate_keys(node: yaml.Node, path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.value in seen:
                raise ManifestError(
                    f"{path}:{key_node.start_mark.line + 1}: key {key_node.value!r} is repeated "
                    f"(first at line {seen[key_node.value]}); a later value would silently win"
                )
            seen[key_node.value] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path)


def _format_error(path: Path, root: yaml.Node, error: dict[str, Any]) -> str:
    at = (error.get("ctx") or {}).get("at")
    if at is not None:  # a check across fields that names the field to fix
        return f"{path}:{_key_node(root, tuple(at)).start_mark.line + 1}: {error['msg']}"
    loc = tuple(p for p in error["loc"] if p not in _SOURCE_KINDS | _MODEL_SIZE_FORMS)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        node = _key_node(root, loc)
        close = difflib.get_close_matches(str(loc[-1]), sorted(_all_field_names(PipelineManifest)), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; remove it or check the spelling"
        return f"{path}:{node.start_mark.line + 1}: unknown field {dotted!r}{hint}"
    node, found = _node_at(root, loc)
    line = node.start_mark.line + 1
    if error["type"] == "missing" or not found:
        return f"{path}:{line}: {dotted}: {error['msg'].lower()} (required field; add it)"
    given = f" (got {error['input']!r})" if not isinstance(error.get("input"), (dict, list)) else ""
    return f"{path}:{line}: {dotted}: {error['msg']}{given}"


# YAML errors the parser notices only where something else begins (often lines later): they are
# reported at the line where the unclosed bracket or quote was opened (the error's context mark).
_OPENED_CONTEXTS = ("while parsing a flow", "while scanning a quoted scalar")


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    problem_mark = getattr(exc, "problem_mark", None)
    context = getattr(exc, "context", None) or ""
    context_mark = getattr(exc, "context_mark", None)
    if context_mark is not None and context.startswith(_OPENED_CONTEXTS):
        what = context.removeprefix("while parsing ").removeprefix("while scanning ")
        found = f" at line {problem_mark.line + 1}, column {problem_mark.column + 1}" if problem_mark else ""
        return (f"{path}:{context_mark.line + 1}: not valid YAML: {what} opened here (column "
                f"{context_mark.column + 1}) is not closed: {problem}{found}")
    where = f":{problem_mark.line + 1}" if problem_mark is not None else ""
    started = f" ({context} at line {context_mark.line + 1})" if context and context_mark is not None else ""
    return f"{path}{where}: not valid YAML: {problem}{started}"


def load_manifest(path: str | Path) -> PipelineManifest:
    """Parse and validate a manifest file; raise ManifestError naming file, line and field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest; pass --manifest or set ${MANIFEST_ENV}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(_yaml_error(path, exc)) from None
    if root is None or not isinstance(data, dict):
        raise ManifestError(f"{path}: the manifest must be a YAML mapping with version, name, sources, budget")
    _check_duplicate_keys(root, path)
    try:
        manifest = PipelineManifest.model_validate(data, context={"base_dir": str(path.resolve().parent)})
    except ValidationError as exc:
        messages = [_format_error(path, root, err) for err in exc.errors()]
        raise ManifestError("\n".join(messages)) from None
    manifest._source_sha256 = hashlib.sha256(raw).hexdigest()
    manifest._path = str(path)
    sources_node, _ = _node_at(root, ("sources",))
    if isinstance(sources_node, yaml.SequenceNode):
        for source, node in zip(manifest.sources, sources_node.value):
            manifest._source_lines[source.name] = node.start_mark.line + 1
    return manifest
