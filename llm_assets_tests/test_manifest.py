"""pipeline.yaml validation: errors name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_assets.manifest import ManifestError, load_manifest
from llm_assets.settings import PROJECT_ROOT

GOOD = """\
version: 1
name: demo
sources:
  - kind: python_stdlib
    shard_mb: 1.0
stages:
  ingest:
    max_doc_bytes: 100000
budget:
  usd_cap: 10
  usd_per_gpu_hour: 2
  peak_flops_per_gpu: 1.0e15
  assumed_mfu: 0.4
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_the_shipped_manifest_is_valid():
    manifest = load_manifest(PROJECT_ROOT / "pipeline.yaml")
    assert len(manifest.model_sizes) >= 2, "the default sweeps at least two sizes"


def test_a_good_manifest_loads(tmp_path):
    manifest = load_manifest(write(tmp_path, GOOD))
    assert manifest.sources[0].shard_mb == 1.0
    assert manifest.stages.ingest.max_doc_bytes == 100000


def test_typo_names_field_line_and_suggestion(tmp_path):
    path = write(tmp_path, GOOD.replace("max_doc_bytes", "max_doc_byte"))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert f"{path}:8:" in message
    assert "stages.ingest.max_doc_byte" in message
    assert "did you mean 'max_doc_bytes'" in message


def test_cut_pieces_longer_than_cleaning_keeps_are_refused(tmp_path):
    cut_long = "max_doc_bytes: 2000000\n  clean:\n    max_chars: 1000"
    path = write(tmp_path, GOOD.replace("max_doc_bytes: 100000", cut_long))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert "ingest.max_doc_bytes (2000000) exceeds clean.max_chars (1000)" in message
    assert "lower ingest.max_doc_bytes or raise clean.max_chars" in message


def test_wrong_type_names_field_line_and_value(tmp_path):
    path = write(tmp_path, GOOD.replace("usd_cap: 10", "usd_cap: lots"))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert f"{path}:10:" in message and "budget.usd_cap" in message and "'lots'" in message


def test_error_inside_a_list_item_points_at_its_line(tmp_path):
    path = write(tmp_path, GOOD.replace("shard_mb: 1.0", "shard_mb: -3"))
    with pytest.raises(ManifestError, match=r":5: sources\.0\.shard_mb: Input should be greater than 0"):
        load_manifest(path)


def test_unknown_source_kind_is_named(tmp_path):
    path = write(tmp_path, GOOD.replace("kind: python_stdlib", "kind: ftp"))
    with pytest.raises(ManifestError, match=r":4: sources\.0"):
        load_manifest(path)


def test_missing_required_field(tmp_path):
    path = write(tmp_path, GOOD.replace("  assumed_mfu: 0.4\n", ""))
    with pytest.raises(ManifestError, match=r"budget\.assumed_mfu: field required"):
        load_manifest(path)


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, GOOD + "name: again\n")
    with pytest.raises(ManifestError, match=r":14: key 'name' is repeated \(first at line 2\)"):
        load_manifest(path)


def test_several_errors_are_reported_together(tmp_path):
    path = write(tmp_path, GOOD.replace("usd_cap: 10", "usd_cap: -1").replace("shard_mb: 1.0", "shard_mbb: 1"))
    message = str(pytest.raises(ManifestError, load_manifest, path).value)
    assert "budget.usd_cap" in message and "shard_mbb" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "must be a YAML mapping"),
        ("version: [1\n", "not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    with pytest.raises(ManifestError, match=expected):
        load_manifest(write(tmp_path, text))


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ManifestError, match="not valid UTF-8 at byte 9"):
        load_manifest(bad)


def test_model_size_consistency(tmp_path):
    text = GOOD + (
        "model_sizes:\n  odd:\n    hidden_size: 100\n    num_layers: 2\n    num_heads: 3\n"
        "    intermediate_size: 256\n    vocab_size: 1000\n    max_seq_len: 64\n"
    )
    with pytest.raises(ManifestError, match=r"model_sizes\.odd: Value error, hidden_size 100 is not divisible"):
        load_manifest(write(tmp_path, text))


def test_a_configured_stage_without_its_gate_threshold_is_refused(tmp_path):
    shipped = (PROJECT_ROOT / "pipeline.yaml").read_text()
    without_kl = "\n".join(line for line in shipped.splitlines() if not line.startswith("  policy_kl:"))
    with pytest.raises(ManifestError, match=r"missing for a required gate: gates\.policy_kl \(stages\.policy is "
                                              r"configured; e\.g\. policy_kl: \{max: \.\.\.\}\)"):
        load_manifest(write(tmp_path, without_kl))
    no_gates = "\n".join(line for line in shipped.splitlines() if not line.startswith("  sft_val_loss:"))
    with pytest.raises(ManifestError, match=r"gates\.sft_val_loss \(stages\.sft is configured"):
        load_manifest(write(tmp_path, no_gates))


def test_a_gate_with_the_wrong_bound_says_which_bound_is_expected(tmp_path):
    """`{min: ...}` where the stage needs `{max: ...}`: not "missing", but the bound expected, the
    bound given, and the gate's own line."""
    shipped = (PROJECT_ROOT / "pipeline.yaml").read_text()
    line = next(n for n, text in enumerate(shipped.splitlines(), 1) if text.startswith("  policy_kl: {max: 20.0}"))
    path = write(tmp_path, shipped.replace("  policy_kl: {max: 20.0}", "  policy_kl: {min: 0.0, blocking: false}"))
    message = str(pytest.raises(ManifestError, load_manifest, path).value)
    assert message.startswith(f"{path}:{line}: gates.policy_kl: expected max, got {{min: 0.0, blocking: false}} "
                              "(stages.policy is configured and needs an upper bound on policy_kl; "
                              "write policy_kl: {max: ...})"), message
    assert "missing" not in message
    # A stage that needs a lower bound, given an upper one.
    line = next(n for n, text in enumerate(shipped.splitlines(), 1) if text.startswith("  reward_accuracy:"))
    original = shipped.splitlines()[line - 1].split("#")[0].strip()
    path = write(tmp_path, shipped.replace(original, "reward_accuracy: {max: 0.9}"))
    with pytest.raises(ManifestError, match=rf":{line}: gates\.reward_accuracy: expected min, got \{{max: 0\.9\}} "
                                             r"\(stages\.reward is configured and needs a lower bound"):
        load_manifest(path)


def test_an_unclosed_flow_sequence_points_at_its_opening_bracket(tmp_path):
    """PyYAML notices the missing `]` only where the next key starts; the message names the bracket's line."""
    unclosed = "    include: [json/*, email/*\n\n    # the packages\n    shard_mb: 1.0\n"
    text = GOOD.replace("    shard_mb: 1.0\n", unclosed)
    path = write(tmp_path, text)
    message = str(pytest.raises(ManifestError, load_manifest, path).value)
    assert message.startswith(f"{path}:5: not valid YAML: a flow sequence opened here (column 14) is not closed: "
                              "expected ',' or ']'"), message
    assert message.endswith("at line 8, column 5"), message  # where the parser noticed it
    # An unclosed quote, likewise; other errors keep the line where the parser stopped.
    path = write(tmp_path, GOOD.replace("name: demo", 'name: "demo'))
    assert f"{path}:2: not valid YAML: a quoted scalar opened here" in str(
        pytest.raises(ManifestError, load_manifest, path).value)
    path = write(tmp_path, GOOD.replace("  usd_cap: 10", "  usd_cap: 10\n - x"))
    assert str(pytest.raises(ManifestError, load_manifest, path).value).startswith(f"{path}:11: not valid YAML")


def test_on_source_error_and_source_lines(tmp_path):
    manifest = load_manifest(write(tmp_path, GOOD))
    assert manifest.on_source_error == "stop"
    assert manifest.source_location("stdlib") == f"{tmp_path / 'pipeline.yaml'}:4"
    assert load_manifest(write(tmp_path, GOOD + "on_source_error: skip\n")).on_source_error == "skip"
    with pytest.raises(ManifestError, match=r":14: on_source_error: Input should be 'stop' or 'skip'"):
        load_manifest(write(tmp_path, GOOD + "on_source_error: ignore\n"))


def test_an_eval_gate_without_the_evaluation_stage_is_refused(tmp_path):
    shipped = (PROJECT_ROOT / "pipeline.yaml").read_text()
    start, end = shipped.index("  evaluation:\n"), shipped.index("# The sweep")
    without_eval = shipped[:start] + "\n" + shipped[end:]
    with pytest.raises(ManifestError, match=r"gates heldout_perplexity\.bits_per_byte, heldout_perplexity\."
                                              r"byte_perplexity, safety\.benign_refusal_rate, "
                                              r"safety\.refusal_rate name eval_report figures "
                                              r"\(task\.metric\) but stages\.evaluation is not configured"):
        load_manifest(write(tmp_path, without_eval))


def test_a_relative_gate_needs_its_baseline_and_a_delta(tmp_path):
    shipped = (PROJECT_ROOT / "pipeline.yaml").read_text()
    gate = "  heldout_perplexity.bits_per_byte: {baseline: unigram, max_delta: -0.1}"
    assert load_manifest(PROJECT_ROOT / "pipeline.yaml").gates["heldout_perplexity.bits_per_byte"].max_delta == -0.1

    def with_gate(line: str):
        assert gate in shipped
        return load_manifest(write(tmp_path, shipped.replace(gate, f"  heldout_perplexity.bits_per_byte: {line}")))

    with pytest.raises(ManifestError, match=r"bits_per_byte: Value error, min_delta/max_delta are relative to a "
                                              r"baseline: add `baseline: release`"):
        with_gate("{max: 4.0, max_delta: 0.05}")
    with pytest.raises(ManifestError, match=r"a baseline needs min_delta"):
        with_gate("{max: 4.0, baseline: release}")
    with pytest.raises(ManifestError, match=r"baseline"):
        with_gate("{max: 4.0, baseline: last_week, max_delta: 1}")


def test_quantization_settings_that_cannot_work_are_refused(tmp_path):
    shipped = (PROJECT_ROOT / "pipeline.yaml").read_text()
    recipe = load_manifest(PROJECT_ROOT / "pipeline.yaml").stages.quantize
    assert recipe is not None and recipe.schemes == ["gptq-4bit", "int8"]

    def changed(old: str, new: str):
        assert old in shipped
        return load_manifest(write(tmp_path, shipped.replace(old, new)))

    with pytest.raises(ManifestError, match=r"stages\.quantize\.group_size 48 must divide the layer widths of every "
                                              r"model size; it does not for tiny-0\.4m \(hidden_size 64, "
                                              r"intermediate_size 256\); tiny-1m \(hidden_size 128"):
        changed("    group_size: 32 ", "    group_size: 48 ")
    assert changed("    group_size: 32 ", "    group_size: 64 ").stages.quantize.group_size == 64
    # int8 has no groups: without GPTQ, any group size is fine.
    int8_only = shipped.replace("schemes: [gptq-4bit, int8]", "schemes: [int8]").replace(
        "group_size: 32 ", "group_size: 48 "
    )
    assert load_manifest(write(tmp_path, int8_only)).stages.quantize.group_size == 48
    with pytest.raises(ManifestError, match=r"schemes.*Input should be 'gptq-4bit' or 'int8'"):
        changed("schemes: [gptq-4bit, int8]", "schemes: [gptq-3bit]")
    with pytest.raises(ManifestError, match=r"schemes are listed twice"):
        changed("schemes: [gptq-4bit, int8]", "schemes: [int8, int8]")
    with pytest.raises(ManifestError, match=r"gates quantized_perplexity_increase compare the quantized model with "
                                              r"its own full-precision model; they take min/max only"):
        changed("quantized_perplexity_increase: {max: 0.10}",
                "quantized_perplexity_increase: {max: 0.10, baseline: release, max_delta: 0.0}")
    with pytest.raises(ManifestError, match=r"missing for a required gate: gates\.quantized_perplexity_increase"):
        changed("  quantized_perplexity_increase: {max: 0.10}", "")
