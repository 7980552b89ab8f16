"""Contamination against everything the graph evaluates on: the measure names the training
documents, every eval source is listed, and a planted eval text blocks the tokenizer."""

import json
import random
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_assets.data.contamination import measure_contamination
from llm_assets.definitions import build_definitions
from llm_assets.evaluation.contamination import eval_stage_sets, prompt_file_sets, task_sets
from llm_assets.evaluation.safety import RED_TEAM_FILE, load_prompts
from llm_assets.evaluation.tasks import PERPLEXITY, TaskSetupError
from llm_assets.manifest import ContaminationRecipe, load_manifest
from llm_assets.runner import materialize_graph
from llm_assets.settings import Settings

DEFAULT_MANIFEST = Path(Settings.from_env().manifest)  # the default graph's pipeline.yaml
SPLITS, TOKENIZER = dg.AssetKey("dataset_splits"), dg.AssetKey("tokenizer")
QUESTION = "Which planet of the solar system is best known for the wide rings of ice and rock around it?"


def prose(rng: random.Random, n: int) -> str:
    """Text that passes the quality filters: words, sentences, lines."""
    tokens = [f"w{rng.randrange(3000)}" for _ in range(n)]
    return "\n".join(" ".join(tokens[i:i + 12]) + "." for i in range(0, n, 12))


def user_task_dir(folder: Path) -> Path:
    """A user lm-eval task whose data is a local JSONL file (`dataset_path: json`)."""
    folder.mkdir()
    rows = [{"question": QUESTION, "choices": ["Saturn", "Mars"], "gold": 0}] + [
        {"question": f"Clean question number {i} about nothing in particular at all today?",
         "choices": ["yes", "no"], "gold": 1} for i in range(3)]
    (folder / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "quiz.yaml").write_text(
        "task: user_quiz\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'quiz.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_a_planted_eval_text_is_contaminated_and_names_its_training_document():
    rng = random.Random(3)
    train = [prose(rng, 200) for _ in range(10)]
    prompt = load_prompts(RED_TEAM_FILE)[1]  # 10 words: shorter than a 13-gram, looked for whole
    boilerplate = " ".join(train[6].split()[:30])
    train[4] += "\n" + prompt
    eval_sets = {
        "prompts": (["p1", "p2", "p3"], [prompt, "Yes it is.", "Tell me a story about a dragon who cannot fly."]),
        # 30 shared words of 95: a licence header's share, not a copy.
        "held_out": (["copy", "header", "clean"], [train[2], boilerplate + " " + prose(rng, 60), prose(rng, 80)]),
    }
    batches = [([f"t{i}" for i in range(5)], train[:5]), ([f"t{i}" for i in range(5, 10)], train[5:])]
    reports = {r.name: r for r in measure_contamination(batches, eval_sets, ContaminationRecipe())}
    prompts, held_out = reports["prompts"], reports["held_out"]
    # A three-word text is found too ("yes it is" is everywhere) but is below min_words: never contaminated.
    assert prompts.contaminated == 1
    assert prompts.contaminated_documents == [{"id": "p1", "overlap": 1.0, "training_documents": ["t4"]}]
    assert held_out.contaminated == 1
    assert held_out.contaminated_documents[0]["training_documents"] == ["t2"]
    header = dict((w["id"], w["overlap"]) for w in held_out.worst)["header"]
    assert 0.1 < header < ContaminationRecipe().doc_overlap


def test_every_eval_source_is_an_eval_set(tmp_path):
    data = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    data["stages"]["evaluation"].update(task_dirs=[str(user_task_dir(tmp_path / "user"))], tasks=["user_quiz"])
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(data))
    manifest = load_manifest(tmp_path / "pipeline.yaml")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("red_team", "held_out_harmful"):  # a prompt file added later is covered by the glob
        (prompts / f"{name}.jsonl").write_text(json.dumps({"id": "x", "prompt": f"{name} prompt text"}) + "\n")
    test = pl.DataFrame({"id": [f"d{i}" for i in range(5)], "source": ["s"] * 5, "kind": ["file"] * 5,
                         "text": [f"held-out document {i}\nline two" for i in range(5)]})
    sets = eval_stage_sets(manifest, test, prompts)
    assert set(sets) == {"red_team", "held_out_harmful", PERPLEXITY, "user_quiz"}
    assert sets["user_quiz"][1][0] == f"{QUESTION}\nSaturn\nMars"
    assert sets[PERPLEXITY][1][0].startswith("held-out document")
    assert set(prompt_file_sets()) >= {"red_team"}  # the shipped folder


def test_a_user_task_whose_data_cannot_be_read_names_the_file(tmp_path):
    folder = user_task_dir(tmp_path / "user")
    (folder / "quiz.jsonl").unlink()
    with pytest.raises(TaskSetupError, match=r"user_quiz.*quiz\.yaml.*quiz\.jsonl"):
        task_sets([folder], ["user_quiz"])
    with pytest.raises(TaskSetupError, match="unknown task 'nope'"):
        task_sets([folder], ["nope"])


@pytest.fixture
def planted_defs(settings, manifest_path, tmp_path):
    """The default manifest on a small local corpus whose documents quote a user task's question and
    a red-team prompt (every document: whichever lands in train carries them)."""
    rng = random.Random(5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    prompt = load_prompts(RED_TEAM_FILE)[4]
    docs = [f"{prose(rng, rng.randrange(120, 300))}\n{QUESTION}\n{prompt}" for _ in range(40)]
    (corpus / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    manifest = yaml.safe_load((DEFAULT_MANIFEST).read_text())
    manifest["sources"] = [{"kind": "local", "name": "web", "paths": [f"{corpus}/*.jsonl"]}]
    manifest["stages"]["splits"] = {"train": 0.7, "val": 0.15, "test": 0.15, "group_by": "document"}
    manifest["stages"]["evaluation"].update(task_dirs=[str(user_task_dir(tmp_path / "user"))], tasks=["user_quiz"])
    manifest_path.write_text(yaml.safe_dump(manifest))
    return build_definitions(settings)


def test_eval_text_in_the_training_split_blocks_the_tokenizer(planted_defs, instance):
    assert materialize_graph(planted_defs, instance, selection='+key:"dedup_corpus"', log=lambda _: None).success
    result = dg.materialize(
        [*planted_defs.assets, *planted_defs.asset_checks], selection=[SPLITS, TOKENIZER],
        instance=instance, resources=planted_defs.resources, raise_on_error=False,
    )
    assert not result.success
    gate = {e.check_name: e for e in result.get_asset_check_evaluations()}["eval_contamination_gate"]
    assert not gate.passed
    assert "user_quiz: 1/4 documents contaminated" in gate.description
    assert "red_team: 1/" in gate.description and "red_team:5 in training documents" in gate.description
    rows = [r.data for r in gate.metadata["contaminated_documents"].value.records]
    assert {r["eval_set"] for r in rows} == {"user_quiz", "red_team"} and all(r["training_documents"] for r in rows)
    assert result.asset_materializations_for_node("tokenizer") == []
