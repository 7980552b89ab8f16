"""Where the embedded default keeps things, overridable by environment variables."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    manifest: str
    store_uri: str
    alerts_jsonl: str
    alert_webhook_url: str | None
    s3_endpoint_url: str | None
    executor: str = "in_process"  # or "k8s": each step in its own pod, with its op tags' resources
    # The code location runs are submitted against under the k8s executor (llm_assets/submit.py):
    # workspace.yaml's name; the Helm chart's is its user deployment's.
    code_location: str = "llm_assets.definitions"
    quantize_python: str = str(PROJECT_ROOT / ".venv-quant" / "bin" / "python")  # see llm_assets/quantize
    # Where an S3 store's objects are cached for local reading; None: a per-user folder
    # ($XDG_CACHE_HOME or ~/.cache, then llm-assets/<bucket>/<prefix>; see llm_assets/store/cache.py).
    cache_dir: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            manifest=env("LLM_ASSETS_MANIFEST", str(PROJECT_ROOT / "pipeline.yaml")),
            store_uri=env("LLM_ASSETS_STORE", str(PROJECT_ROOT / ".artifacts")),
            alerts_jsonl=env("LLM_ASSETS_ALERTS_JSONL", str(PROJECT_ROOT / ".alerts" / "alerts.jsonl")),
            alert_webhook_url=env("LLM_ASSETS_ALERT_WEBHOOK_URL") or None,
            s3_endpoint_url=env("LLM_ASSETS_S3_ENDPOINT_URL") or None,
            executor=env("LLM_ASSETS_EXECUTOR") or "in_process",
            code_location=env("LLM_ASSETS_CODE_LOCATION") or cls.code_location,
            quantize_python=env("LLM_ASSETS_QUANTIZE_PYTHON") or cls.quantize_python,
            cache_dir=env("LLM_ASSETS_CACHE_DIR") or None,
        )


@functools.cache
def code_revision() -> str:
    """The git commit of the running code, `-dirty` when tracked files differ from it. An image
    has no .git: it sets $LLM_ASSETS_GIT_COMMIT at build time; elsewhere outside git, `unknown`."""
    if os.environ.get("LLM_ASSETS_GIT_COMMIT"):
        return os.environ["LLM_ASSETS_GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_dagster_home(home: Path) -> Path:
    """Create a Dagster home with the project's instance config (sqlite, no telemetry) unless it has one."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", config)
    return home


def artifact_store_resource(settings: Settings):
    """The artifact store these settings name: a local directory, or S3 through dagster-aws."""
    from dagster_aws.s3 import S3Resource

    from resources.artifact_store_resource import ArtifactStoreResource

    s3 = S3Resource(endpoint_url=settings.s3_endpoint_url) if settings.store_uri.startswith("s3://") else None
    return ArtifactStoreResource(uri=settings.store_uri, s3=s3, cache_dir=settings.cache_dir)
