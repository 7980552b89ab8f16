"""Evaluation of exported models, without Dagster: the future `eval_report` asset wraps these.

- `tasks`: lm-eval task directories — the shipped held-out tasks (perplexity, multiple choice,
  generation) written from the test split, and users' own task directories.
- `harness`: lm-eval run offline on a model directory; figures per task and metric.
- `safety`: refusal rate on the shipped red-team prompts.
- `report`: the report (JSON, markdown) and its change against a previous one.

The modules are imported one by one (`from llm_assets.evaluation.report import EvalReport`):
importing lm-eval takes seconds, and only `harness` and `tasks.load_task_dirs` need it.
"""
