"""The production configuration under k8s/ and the Dockerfile, checked without a cluster or an
image build: Kubernetes resources against the API schemas (strict), the Dagster instance variants
against Dagster's own config schemas, the Helm values and the Dockerfile against the code they
start; and the PostgreSQL instance against a real PostgreSQL server on 127.0.0.1."""

from __future__ import annotations

import importlib
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes_validate
import psycopg2
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._serdes import ConfigurableClassData
from psycopg2 import sql

from llm_assets.definitions import build_resources
from llm_assets.runner import materialize_graph
from llm_assets.settings import PROJECT_ROOT, Settings

K8S_VERSION = "1.31"
K8S_DIR = PROJECT_ROOT / "k8s"
INSTANCE_CONFIGS = {name: K8S_DIR / "dagster-instance" / f"{name}.yaml" for name in ("postgres", "k8s")}
HELM_VALUES = K8S_DIR / "helm" / "values.yaml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
# The command the Helm chart starts a user deployment with, before its dagsterApiGrpcArgs.
CHART_GRPC_COMMAND = ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port"]
PG_ENV = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD")
# What k8s.yaml reads from the Secret created with kubectl (docs/deployment.md), not from the ConfigMap.
SECRET_ENV = {"DAGSTER_PG_PASSWORD"}
CORPUS = "key:raw_corpus or key:corpus_inventory"


def k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document under k8s/ that is a Kubernetes resource (Helm values and
    dagster.yaml files are not)."""
    return [
        (path, doc)
        for path in sorted(K8S_DIR.rglob("*.y*ml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
    ]


def validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def helm_values() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


def user_deployment() -> dict[str, Any]:
    deployments = helm_values()["dagster-user-deployments"]["deployments"]
    assert [d["name"] for d in deployments] == ["llm-assets"]
    return deployments[0]


def env_refs(node: Any) -> set[str]:
    """Every environment variable a Dagster config reads through `{env: NAME}`."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {node["env"]}
        return set().union(*(env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node))
    return set()


# --- Kubernetes resources ---------------------------------------------------------------------


def test_every_kubernetes_resource_under_k8s_validates():
    resources = k8s_resources()
    assert resources, "k8s/ holds no Kubernetes resource: the glob or the layout changed"
    for path, resource in resources:
        try:
            validate(resource)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.relative_to(PROJECT_ROOT)}: {resource['kind']} is invalid: {error}")


# --- Dagster instance variants ----------------------------------------------------------------


def validated_class_config(data: ConfigurableClassData) -> Mapping[str, Any]:
    """What ConfigurableClassData.rehydrate checks, short of instantiating the class (which would
    connect to the database or load a cluster's credentials)."""
    klass = getattr(importlib.import_module(data.module_name), data.class_name)
    result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
    if not result.success:
        raise dg.DagsterInvalidConfigError(f"{data.class_name}:", result.errors, data.config_dict)
    return result.value


def instance_ref(config: Path | dict[str, Any], home: Path) -> InstanceRef:
    """Dagster's own loading and validation of a dagster.yaml, from a fresh DAGSTER_HOME."""
    home.mkdir(parents=True, exist_ok=True)
    text = config.read_text() if isinstance(config, Path) else yaml.safe_dump(config)
    (home / "dagster.yaml").write_text(text)
    return InstanceRef.from_dir(str(home))


@pytest.fixture
def pg_env_example(monkeypatch) -> dict[str, str]:
    env = dict(zip(PG_ENV, ("db.example", "6543", "dagster", "dagster", "s3cret"), strict=True))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.mark.parametrize("variant", sorted(INSTANCE_CONFIGS))
def test_instance_variant_passes_dagsters_validation(variant, tmp_path, pg_env_example):
    raw = yaml.safe_load(INSTANCE_CONFIGS[variant].read_text())
    assert raw["telemetry"] == {"enabled": False}
    ref = instance_ref(INSTANCE_CONFIGS[variant], tmp_path)
    assert ref.storage_data.class_name == "DagsterPostgresStorage"
    db = validated_class_config(ref.storage_data)["postgres_db"]
    assert db == {
        "hostname": "db.example", "port": 6543, "db_name": "dagster", "username": "dagster",
        "password": "s3cret", "params": {}, "scheme": "postgresql+psycopg2",
    }
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    validated_class_config(ref.run_coordinator_data)
    launcher = validated_class_config(ref.run_launcher_data)
    if variant == "k8s":
        assert ref.run_launcher_data.class_name == "K8sRunLauncher"
        assert launcher["instance_config_map"] == "dagster-instance"
    else:
        assert ref.run_launcher_data.class_name == "DefaultRunLauncher"


def test_a_misspelled_run_launcher_field_is_refused(tmp_path, pg_env_example):
    """The validation is not a rubber stamp: the class's own schema refuses an unknown field."""
    config = yaml.safe_load(INSTANCE_CONFIGS["k8s"].read_text())
    config["run_launcher"]["config"]["run_k8s_configs"] = config["run_launcher"]["config"].pop("run_k8s_config")
    with pytest.raises(dg.DagsterInvalidConfigError, match="run_k8s_configs"):
        validated_class_config(instance_ref(config, tmp_path).run_launcher_data)


def test_the_k8s_instance_shares_the_postgres_storage_and_gets_its_environment():
    postgres, k8s = (yaml.safe_load(path.read_text()) for path in INSTANCE_CONFIGS.values())
    assert k8s["storage"] == postgres["storage"], "the two variants' storage sections drifted apart"
    launcher = k8s["run_launcher"]["config"]
    config_maps = {doc["metadata"]["name"]: doc["data"] for _, doc in k8s_resources() if doc["kind"] == "ConfigMap"}
    provided = set().union(*(config_maps[name] for name in launcher["env_config_maps"]))
    assert env_refs(k8s) - SECRET_ENV <= provided, "a variable the instance reads is in no ConfigMap"
    assert {"LLM_ASSETS_STORE", "LLM_ASSETS_MANIFEST"} <= provided
    assert launcher["env_secrets"] == ["llm-assets-secrets"]


# --- Helm values --------------------------------------------------------------------------------


def test_helm_values_load_our_definitions():
    values = helm_values()
    assert values["dagster-user-deployments"]["enabled"] and values["dagster-user-deployments"]["enableSubchart"]
    deployment = user_deployment()
    args = dict(zip(deployment["dagsterApiGrpcArgs"][::2], deployment["dagsterApiGrpcArgs"][1::2], strict=True))
    module = importlib.import_module(args["--module-name"])
    assert isinstance(getattr(module, args["--attribute"]), dg.Definitions)
    assert deployment["image"]["repository"].endswith("/llm-assets") and deployment["image"]["tag"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["telemetry"] == {"enabled": False}


def test_helm_values_use_external_postgres_with_the_instance_scheme():
    postgres = helm_values()["postgresql"]
    assert postgres["enabled"] is False and postgres["postgresqlHost"]
    instance_db = yaml.safe_load(INSTANCE_CONFIGS["k8s"].read_text())["storage"]["postgres"]["postgres_db"]
    assert postgres["postgresqlScheme"] == instance_db["scheme"]


def test_helm_env_selects_the_s3_store(monkeypatch):
    env = {item["name"]: item["value"] for item in user_deployment()["env"]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings.store_uri == env["LLM_ASSETS_STORE"] and settings.store_uri.startswith("s3://")
    store = build_resources(settings)["artifact_store"]
    assert store.s3 is not None and store.s3.endpoint_url == env["LLM_ASSETS_S3_ENDPOINT_URL"]
    mounts = {m["name"]: m["mountPath"] for m in user_deployment()["volumeMounts"]}
    assert env["LLM_ASSETS_MANIFEST"] == f"{mounts['manifest']}/pipeline.yaml"


def test_helm_kubernetes_fragments_validate():
    """The values that the chart copies into pod specs, placed where it puts them."""
    deployment = user_deployment()
    image = deployment["image"]
    container = {
        "name": "dagster-user-deployments",
        "image": f"{image['repository']}:{image['tag']}",
        "imagePullPolicy": image["pullPolicy"],
        "env": deployment["env"],
        "envFrom": [{"secretRef": ref} for ref in deployment["envSecrets"]],
        "ports": [{"containerPort": deployment["port"]}],
        "resources": deployment["resources"],
        "volumeMounts": deployment["volumeMounts"],
    }
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user-code"},
              "spec": {"containers": [container], "volumes": deployment["volumes"]}})
    run_config = helm_values()["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    run_container = {"name": "dagster", "image": container["image"], **run_config["containerConfig"]}
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "run"},
              "spec": {"containers": [run_container], **run_config.get("podSpecConfig", {})}})


# --- Dockerfile -----------------------------------------------------------------------------------


TORCH_INDEX_FILE = "/opt/torch-index"  # where the Dockerfile writes the torch variant's wheel index


def pyproject() -> dict[str, Any]:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for keyword, args in instructions if keyword == "ENV" for pair in shlex.split(args))


def test_dockerfile_builds_the_quantization_environment_the_settings_name():
    """gptqmodel's venv: the CPU torch first, then requirements-quantize.txt, then the project
    without its dependencies (which would bring Dagster's protobuf back)."""
    instructions = dockerfile_instructions()
    python = dockerfile_env(instructions)["LLM_ASSETS_QUANTIZE_PYTHON"]
    venv = python.removesuffix("/bin/python")
    steps = [cmd.strip() for keyword, args in instructions if keyword == "RUN" for cmd in args.split("&&")]
    order = [steps.index(f"python -m venv {venv}"),
             steps.index(f'{venv}/bin/pip install --index-url "$(cat {TORCH_INDEX_FILE})" torch==2.13.0'),
             steps.index(f"{venv}/bin/pip install -r requirements-quantize.txt"),
             steps.index(f"{venv}/bin/pip install --no-deps .")]
    assert order == sorted(order)
    assert ("COPY", "requirements-quantize.txt ./") in instructions
    requirements = (PROJECT_ROOT / "requirements-quantize.txt").read_text()
    assert "gptqmodel==7.6.0" in requirements and "dagster-pipes==" in requirements
    assert "\ndagster==" not in requirements and "torch==2.13.0" in requirements


def test_dockerfile_pins_torch_of_the_variant_before_the_project():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch=="))
    torch_steps = [i for i, args in enumerate(runs) if torch_pin in shlex.split(args)]
    project_steps = [i for i, args in enumerate(runs) if "pip install ." in args]
    index_steps = [i for i, args in enumerate(runs) if args.endswith(f"> {TORCH_INDEX_FILE}")]
    assert torch_steps and project_steps, f"the Dockerfile must RUN pip install {torch_pin}, then pip install ."
    assert index_steps[0] < torch_steps[0] < project_steps[0], (
        "choose the index, then install torch from it, before the project pulls PyPI's default wheel")
    assert f'--index-url "$(cat {TORCH_INDEX_FILE})"' in runs[torch_steps[0]]


def _torch_index(variant: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's index-choosing RUN, run by sh with the build arguments as docker passes them."""
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg)
    script = next(arg for keyword, arg in instructions if keyword == "RUN" and arg.endswith(f"> {TORCH_INDEX_FILE}"))
    env = {**args, **({"TORCH_VARIANT": variant} if variant is not None else {}), "PATH": os.environ["PATH"]}
    return subprocess.run(["sh", "-c", script.replace(TORCH_INDEX_FILE, str(tmp_path / "index"))],
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize(("variant", "index"), [(None, "https://download.pytorch.org/whl/cpu"),
                                                 ("cuda", "https://download.pytorch.org/whl/cu13")])
def test_dockerfile_variants_install_torch_from_their_index(variant, index, tmp_path):
    done = _torch_index(variant, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "index").read_text().strip().startswith(index)


def test_dockerfile_refuses_an_unknown_torch_variant(tmp_path):
    done = _torch_index("gpu", tmp_path)
    assert done.returncode != 0 and "TORCH_VARIANT must be cpu or cuda, not 'gpu'" in done.stderr


def test_dockerfile_copies_what_the_build_and_the_settings_need():
    instructions = dockerfile_instructions()
    ignored = [p for p in (PROJECT_ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert {".venv", ".artifacts", ".dagster_home", ".alerts"} <= set(ignored)
    workdir = next(args for keyword, args in instructions if keyword == "WORKDIR")
    copied: dict[str, str] = {}  # source -> path in the image
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                assert (PROJECT_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
                assert not any(fnmatch(source, pattern) for pattern in ignored), f"COPY {source} is .dockerignored"
                target = dest if dest.startswith("/") else f"{workdir}/{dest.removeprefix('./')}"
                copied[source] = f"{target.rstrip('/')}/{source}" if dest.endswith("/") else target
    project = pyproject()
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= set(copied)
    env = dockerfile_env(instructions)
    assert env["LLM_ASSETS_MANIFEST"] == copied["pipeline.yaml"]
    assert env["HF_HUB_OFFLINE"] == "1"


def test_dockerfile_starts_the_code_server_the_chart_starts():
    instructions = dockerfile_instructions()
    cmd = json.loads(next(args for keyword, args in instructions if keyword == "CMD"))
    deployment = user_deployment()
    assert cmd == [*CHART_GRPC_COMMAND, str(deployment["port"]), *deployment["dagsterApiGrpcArgs"]]
    assert ("EXPOSE", str(deployment["port"])) in instructions


# --- A real PostgreSQL --------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str = "postgres"):
        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin_dir() -> Path:
    """The directory of initdb and pg_ctl: from PATH, else Debian's versioned layout, which keeps
    the server binaries off PATH."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, reverse=True)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/install-system-packages.sh")


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: PostgreSQL refuses to run as root, so root hands it to the `postgres`
    user that Debian's package creates."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root, PostgreSQL needs a `postgres` user to run as: run "
                    "scripts/install-system-packages.sh, or run the tests as a non-root user")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL on 127.0.0.1 with a throwaway data directory; stopped at teardown."""
    bin_dir, user = _postgres_bin_dir(), _server_user()
    as_user = ["runuser", "-u", user.pw_name, "--"] if user else []
    # Not pytest's tmp_path: its base directory is private to the current user, and root hands
    # the server to another one.
    base = Path(tempfile.mkdtemp(prefix="llm-assets-pg-"))
    server = Postgres("127.0.0.1", _free_port(), "dagster", "test-password")
    data, log = base / "data", base / "postgres.log"
    (base / "pwfile").write_text(server.password)
    if user:
        os.chown(base, user.pw_uid, user.pw_gid)
        os.chown(base / "pwfile", user.pw_uid, user.pw_gid)

    def run(*args: str) -> None:
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{' '.join(args[:2])} failed: {result.stdout}{result.stderr}{server_log}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "--username", server.user, "--pwfile",
            str(base / "pwfile"), "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C", "--no-sync")
        # TCP on 127.0.0.1 only (no unix socket: its default directory may not be writable);
        # durability off, the data is thrown away.
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {server.port}\nunix_socket_directories = ''\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        run(str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", "60")
        try:
            yield server
        finally:
            run(str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_env(postgres, request, monkeypatch) -> dict[str, str]:
    """A fresh database on the server, and the DAGSTER_PG_* variables the instance configs read."""
    name = "test_" + request.node.name.lower().replace("[", "_").replace("]", "")
    conn = postgres.connect()
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    env = dict(zip(PG_ENV, (postgres.host, str(postgres.port), name, postgres.user, postgres.password), strict=True))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_the_graph_runs_on_postgres_storage(defs, tmp_path, postgres, pg_env):
    """Runs, materializations and check results of a real drive land in PostgreSQL (not in a
    sqlite file) and read back through a second instance on the same config."""
    homes = [tmp_path / "writer", tmp_path / "reader"]
    for home in homes:
        home.mkdir()
        shutil.copyfile(INSTANCE_CONFIGS["postgres"], home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(homes[0])) as instance:
        result = materialize_graph(defs, instance, selection=CORPUS, log=lambda _: None)
    assert result.success and result.outcomes

    with postgres.connect(pg_env["DAGSTER_PG_DB"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs")
        runs = dict(cur.fetchall())
        cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        (materializations,) = cur.fetchone()
        cur.execute("SELECT asset_key, check_name, execution_status FROM asset_check_executions")
        checks = cur.fetchall()
        cur.execute("SELECT count(*) FROM dynamic_partitions")
        (shards,) = cur.fetchone()
    conn.close()
    assert set(runs.values()) == {"SUCCESS"}
    assert materializations == len(result.outcomes)
    assert shards == len({o.partition for o in result.outcomes if o.asset == "raw_corpus"})
    assert checks and {status for *_, status in checks} == {"SUCCEEDED"}
    assert {json.loads(key)[0] for key, *_ in checks} == {"raw_corpus", "corpus_inventory"}
    assert not list(homes[0].rglob("*.db")), "a sqlite database was written: the storage config was not used"

    with dg.DagsterInstance.from_config(str(homes[1])) as reader:
        assert {r.run_id for r in reader.get_runs()} == set(runs)
        inventory = reader.fetch_materializations(dg.AssetKey("corpus_inventory"), limit=10).records
        assert len(inventory) == 1
        check_keys = [k for k in defs.resolve_asset_graph().asset_check_keys
                      if k.asset_key == dg.AssetKey("corpus_inventory")]
        assert check_keys
        for key in check_keys:
            (latest,) = reader.event_log_storage.get_asset_check_execution_history(key, limit=1)
            assert latest.status == AssetCheckExecutionRecordStatus.SUCCEEDED and latest.run_id in runs
