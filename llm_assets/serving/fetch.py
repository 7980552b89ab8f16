"""`python -m llm_assets.serving.fetch SHA256 DIR`: copy a model artifact out of the store, every
file checked against the artifact's manifest; what a serving pod's init container runs.

The store comes from the environment as everywhere else (`LLM_ASSETS_STORE`, and for S3
`LLM_ASSETS_S3_ENDPOINT_URL` plus the usual AWS credentials).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from llm_assets.settings import Settings, artifact_store_resource
from llm_assets.store import ArtifactStoreError


def fetch(sha256: str, target: Path) -> Path:
    store = artifact_store_resource(Settings.from_env()).get_store()
    shutil.copytree(store.local_dir(sha256, verify=True), target, dirs_exist_ok=True)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m llm_assets.serving.fetch SHA256 DIR", file=sys.stderr)
        return 2
    try:
        target = fetch(argv[0], Path(argv[1]))
    except ArtifactStoreError as exc:
        print(f"cannot fetch model {argv[0][:12]}: {exc}", file=sys.stderr)
        return 1
    print(f"model {argv[0][:12]} verified and copied to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
