"""Deploy artifacts, validated without Docker or a cluster: every YAML parses, the chart's
templates reference values that exist, the example configs load with the bridge's own
config loader against the repository's mappings, and the wiring between files holds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.config.loader import substitute_env
from bridge.config.model import build_config
from bridge.mapping import load_mapping_dir
from bridge.mapping.loader import compile_mapping_dir
from bridge.runtime import check_mappings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "bridge"
TEMPLATES = CHART / "templates"
CONFIG_PATH = "/etc/bridge/bridge.yaml"

ACTION_RE = re.compile(r"{{-?(.*?)-?}}", re.DOTALL)
COMMENT_RE = re.compile(r"{{-?\s*/\*.*?\*/\s*-?}}", re.DOTALL)
VALUES_REF_RE = re.compile(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
SIMPLE_VALUE_RE = re.compile(r"^\s*\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*(\|\s*quote\s*)?$")
TO_YAML_RE = re.compile(
    r"^\s*{{-?\s*toYaml\s+\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*\|\s*nindent\s+(\d+)\s*-?}}\s*$"
)
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
OPENERS = ("if", "range", "with", "define", "block")


def values() -> dict[str, Any]:
    data = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(data, dict)
    return data


def lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.strip(".").split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def neutralise(text: str, vals: dict[str, Any]) -> str:
    """Template text -> YAML: simple `.Values.x` actions become their values, lines holding
    only control actions are dropped, and any other action becomes a placeholder scalar."""
    text = COMMENT_RE.sub("", text)
    out: list[str] = []
    for line in text.splitlines():
        block = TO_YAML_RE.match(line)
        if block:  # {{- toYaml .Values.x | nindent N }}: what helm would emit
            dumped = yaml.safe_dump(lookup(vals, block.group(1)), default_flow_style=False, sort_keys=False)
            out.extend(" " * int(block.group(2)) + part for part in dumped.splitlines())
            continue
        if line.strip() and not ACTION_RE.sub("", line).strip():
            continue  # {{- if ... }}, {{- end }}, {{- include ... | nindent 4 }} ...
        out.append(ACTION_RE.sub(lambda m: _render_action(m.group(1), vals), line))
    return "\n".join(out) + "\n"


def _render_action(action: str, vals: dict[str, Any]) -> str:
    m = SIMPLE_VALUE_RE.match(action)
    if m:
        value = lookup(vals, m.group(1))
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, str | int | float):
            return json.dumps(str(value)) if m.group(2) else str(value)
    return "TEMPLATED"


def template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.suffix in (".yaml", ".yml"))


def rendered_docs(vals: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    vals = values() if vals is None else vals
    docs: dict[str, list[dict[str, Any]]] = {}
    for path in template_files():
        try:
            loaded = [d for d in yaml.safe_load_all(neutralise(path.read_text(), vals)) if d is not None]
        except yaml.YAMLError as exc:
            raise AssertionError(f"{path.relative_to(REPO)} is not valid YAML once neutralised: {exc}") from None
        docs[path.name] = loaded
    return docs


def docs_of_kind(kind: str, vals: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [d for ds in rendered_docs(vals).values() for d in ds if d.get("kind") == kind]


def fake_env(text: str) -> dict[str, str]:
    # Secrets full of YAML-significant characters: quoting in the configs must hold them.
    # The store password sits in a URL, where '#' must be percent-encoded (docs/operations.md).
    return {
        name: f"x-{name.lower()}-{'%23' if name == 'POSTGRES_PASSWORD' else '#'}: ,'v" for name in required_env(text)
    }


def required_env(text: str) -> set[str]:
    return {name for name, default in ENV_REF_RE.findall(text) if not default}


def load_bridge_config(text: str, where: str) -> Any:
    substituted, missing = substitute_env(text, fake_env(text))
    assert not missing
    data = yaml.safe_load(substituted)
    cfg = build_config(data, where)
    problems = check_mappings(cfg, load_mapping_dir(REPO / "mappings"))
    assert not problems, problems
    return cfg


# -- YAML everywhere ------------------------------------------------------------------------
def test_every_plain_yaml_file_under_deploy_parses() -> None:
    plain = [p for p in DEPLOY.rglob("*.y*ml") if TEMPLATES not in p.parents]
    assert {p.name for p in plain} >= {"docker-compose.yml", "bridge.yaml", "Chart.yaml", "values.yaml"}
    for path in plain:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc is not None, f"{path}: empty document"


def test_every_helm_template_parses_into_kubernetes_objects() -> None:
    docs = rendered_docs()
    assert set(docs) >= {"deployment.yaml", "service.yaml", "configmap.yaml", "pdb.yaml"}
    kinds = set()
    for name, objects in docs.items():
        assert objects, f"{name} renders nothing"
        for obj in objects:
            assert {"apiVersion", "kind", "metadata"} <= set(obj), f"{name}: {obj}"
            assert obj["metadata"].get("name"), f"{name}: metadata.name missing"
            kinds.add(obj["kind"])
    assert kinds == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"}


def test_the_bridge_is_not_pid_1_in_its_pod() -> None:
    """As PID 1 the kernel drops a SIGTERM that arrives before Python holds its signals;
    Kubernetes has no --init, so the pod shares its process namespace (the pause container
    is PID 1)."""
    (deployment,) = rendered_docs()["deployment.yaml"]
    assert deployment["spec"]["template"]["spec"]["shareProcessNamespace"] is True


def test_template_actions_are_balanced_and_helpers_exist() -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    defined = set(re.findall(r'{{-?\s*define\s+"([^"]+)"', helpers))
    for path in [*template_files(), TEMPLATES / "_helpers.tpl", TEMPLATES / "NOTES.txt"]:
        text = COMMENT_RE.sub("", path.read_text())
        actions = [a.strip() for a in ACTION_RE.findall(text)]
        opened = sum(1 for a in actions if a.split(" ", 1)[0] in OPENERS)
        closed = sum(1 for a in actions if a == "end")
        assert opened == closed, f"{path.name}: {opened} blocks opened, {closed} closed"
        for name in re.findall(r'include\s+"([^"]+)"', text):
            assert name in defined, f"{path.name}: include of undefined template {name!r}"


def test_every_values_reference_exists_in_values_yaml() -> None:
    vals = values()
    missing = []
    for path in [*TEMPLATES.iterdir()]:
        for ref in VALUES_REF_RE.findall(path.read_text()):
            try:
                lookup(vals, ref)
            except KeyError:
                missing.append(f"{path.name}: .Values{ref}")
    assert not missing, missing


def test_the_neutraliser_catches_a_missing_value() -> None:
    # Guards the test above: a reference to an absent value must be reported.
    with pytest.raises(KeyError):
        lookup(values(), ".probes.liveness.nope")
    assert (
        neutralise("a: {{ .Values.containerPort }}\n{{- if x }}\nb: {{ y }}\n", values()) == "a: 8088\nb: TEMPLATED\n"
    )


# -- the Deployment ------------------------------------------------------------------------
def deployment() -> dict[str, Any]:
    (dep,) = docs_of_kind("Deployment")
    return dep


def test_deployment_probes_scrape_annotations_and_secret_env() -> None:
    dep = deployment()
    pod = dep["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(values()["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"] == ["serve", "--config", CONFIG_PATH]
    refs = [e for e in container["env"] if "valueFrom" in e]
    assert refs and all("secretKeyRef" in e["valueFrom"] for e in refs)
    assert not any("value" in e and "KEY" in str(e.get("name", "")) for e in container["env"])
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_helm_config_loads_and_its_secrets_come_from_the_secret() -> None:
    vals = values()
    text = vals["config"]
    assert isinstance(text, str), "config must stay a string so ${SECRET} quoting survives"
    cfg = load_bridge_config(text, "values.yaml:config")
    assert cfg.server.port == vals["containerPort"]
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.shutdown_timeout < vals["terminationGracePeriodSeconds"]
    provided = set(vals["secrets"]["env"]) | {e["name"] for e in vals["extraEnv"]}
    assert required_env(text) <= provided, required_env(text) - provided
    assert set(vals["secrets"]["optional"]) <= set(vals["secrets"]["env"])
    # No secret value sits in the ConfigMap: every secret field is an ${ENV} reference.
    raw = yaml.safe_load(text)
    for field in ("token",):
        assert str(raw["admin"][field]).startswith("${")


def test_pdb_selects_the_deployment_pods() -> None:
    (pdb,) = docs_of_kind("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert "matchLabels" in pdb["spec"]["selector"]
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "bridge"
    assert re.match(r"^\d+\.\d+\.\d+$", chart["version"])
    assert chart["appVersion"]


# -- Dockerfile ----------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck() -> None:
    ins = dockerfile()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and all(re.search(r"\bAS\s+\w+", f, re.IGNORECASE) for f in froms)
    assert all("slim" in f for f in froms)
    last_stage = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    users = [rest for word, rest in last_stage if word == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 1000
    assert users[-1].split(":")[0] == str(values()["podSecurityContext"]["runAsUser"])
    (health,) = [rest for word, rest in last_stage if word == "HEALTHCHECK"]
    assert "urllib" in health and "python" in health
    env = " ".join(rest for word, rest in last_stage if word == "ENV")
    assert "/healthz" in env or "/healthz" in health
    assert ("EXPOSE", "8088") in last_stage
    entry = json.loads(next(rest for word, rest in last_stage if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in last_stage if word == "CMD"))
    assert entry + cmd == ["bridge", "serve", "--config", CONFIG_PATH]


async def test_healthcheck_command_passes_on_200_and_fails_otherwise() -> None:
    (health,) = [rest for word, rest in dockerfile() if word == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "python"
    status = {"code": 200}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=status["code"], text="{}")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        env = {**os.environ, "BRIDGE_HEALTHCHECK_URL": str(server.make_url("/healthz"))}
        codes = []
        for code in (200, 503):
            status["code"] = code
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv[1:], env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            codes.append(await asyncio.wait_for(proc.wait(), 30))
    finally:
        await server.close()
    assert codes[0] == 0 and codes[1] != 0


def test_dockerfile_copies_files_that_exist_and_stages_that_exist() -> None:
    ins = dockerfile()
    stages = {m.group(1) for w, rest in ins if w == "FROM" and (m := re.search(r"\bAS\s+(\w+)", rest, re.I))}
    for word, rest in ins:
        if word != "COPY":
            continue
        args = shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        sources = [a for a in args if not a.startswith("--")][:-1]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if from_stage is not None:
            assert from_stage in stages
            continue
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the build context (repository root)"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for word, rest in dockerfile():
        if word == "COPY" and "--from" not in rest:
            for src in [a for a in shlex.split(rest) if not a.startswith("--")][:-1]:
                assert f"!{src}" in ignore, f"{src} is excluded from the build context"


def test_every_sqlite_url_the_deploy_docs_suggest_puts_the_store_in_the_image_volume() -> None:
    """`sqlite:///x` is x relative to the working directory (README, store.url): a suggested
    sqlite:///var/lib/bridge/bridge.db landed in /var/lib/bridge/var/lib/bridge/, not where
    the comments said."""
    last_stage = dockerfile()[max(i for i, (w, _) in enumerate(dockerfile()) if w == "FROM") :]
    workdir = PurePosixPath(next(rest for word, rest in reversed(last_stage) if word == "WORKDIR"))
    (volume,) = json.loads(next(rest for word, rest in last_stage if word == "VOLUME"))
    texts = [p.read_text() for p in DEPLOY.rglob("*") if p.is_file()] + [(REPO / "docs" / "operations.md").read_text()]
    urls = {url for text in texts for url in re.findall(r"sqlite:///[^\s`'\"]+?\.db", text)}
    assert urls
    for url in urls:
        path = workdir / url[len("sqlite:///") :]  # an absolute path stays as it is
        assert path.parent == PurePosixPath(volume), f"{url} is {path}, outside the volume {volume}"


def test_the_documented_docker_run_keeps_the_store_and_lets_the_bridge_drain() -> None:
    """docs/operations.md's `docker run --rm`: Docker deletes a container's anonymous volumes
    with it, so the image's VOLUME (the SQLite store) must be a named one; and `docker stop`
    waits 10 s unless told otherwise, less than server.shutdown_timeout."""
    last_stage = dockerfile()[max(i for i, (w, _) in enumerate(dockerfile()) if w == "FROM") :]
    (volume,) = json.loads(next(rest for word, rest in last_stage if word == "VOLUME"))
    text = (REPO / "docs" / "operations.md").read_text().replace("\\\n", " ")
    runs = [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("docker run ")]
    assert runs
    example = yaml.safe_load((DEPLOY / "example" / "bridge.yaml").read_text())
    for argv in runs:
        mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
        data = [m.split(":")[0] for m in mounts if m.split(":")[1] == volume]
        assert data and not data[0].startswith("/"), f"{volume} is not a named volume in {argv}"
        stop = argv[argv.index("--stop-timeout") + 1] if "--stop-timeout" in argv else "10"
        assert int(stop) > example["server"]["shutdown_timeout"]
        # Not PID 1 itself: the kernel drops a SIGTERM sent while Python still imports.
        assert "--init" in argv, argv
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["bridge"].get("init") is True


def test_the_documented_helm_mappings_example_is_a_set_the_chart_config_runs_on(tmp_path: Path) -> None:
    """The chart mounts mappings.files over the image's mappings directory as a whole: the
    files docs/operations.md passes must alone load and cover the chart's config (two of
    them, a mapping and a lookup, left the pod failing at start)."""
    text = (REPO / "docs" / "operations.md").read_text()
    files = re.findall(r"--set-file '?mappings\.files\.((?:[^=\\']|\\.)+)=([^'\s]+)'?", text)
    assert files
    for key, source in files:
        target = tmp_path / key.replace("\\.", ".")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / source).read_bytes())
    config = values()["config"]
    substituted, _ = substitute_env(config, fake_env(config))
    cfg = build_config(yaml.safe_load(substituted), "values.yaml")
    mappings, diagnostics = compile_mapping_dir(tmp_path)
    assert not diagnostics, [str(d) for d in diagnostics]
    assert not check_mappings(cfg, mappings)


# -- docker compose ------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_bridge_and_postgres_from_files_that_exist() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"] == "postgres:16"
    bridge = services["bridge"]
    context = (DEPLOY / bridge["build"]["context"]).resolve()
    assert context == REPO
    assert (context / bridge["build"]["dockerfile"]).is_file()
    mounts = {}
    for volume in bridge["volumes"]:
        host, container = volume.split(":")[:2]
        assert (DEPLOY / host).exists(), f"{volume}: {host} does not exist"
        mounts[container] = (DEPLOY / host).resolve()
    assert mounts[CONFIG_PATH] == (DEPLOY / "example" / "bridge.yaml").resolve()
    assert mounts["/etc/bridge/mappings"] == (REPO / "mappings").resolve()
    assert bridge["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]


def test_example_config_loads_uses_postgres_and_gets_every_secret_from_compose() -> None:
    text = (DEPLOY / "example" / "bridge.yaml").read_text()
    cfg = load_bridge_config(text, "deploy/example/bridge.yaml")
    assert cfg.store.url.startswith("postgresql://") and "@postgres:5432/" in cfg.store.url
    assert cfg.mappings.dir == "/etc/bridge/mappings"
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8088
    environment = compose()["services"]["bridge"]["environment"]
    assert required_env(text) <= set(environment), required_env(text) - set(environment)
    example_env = (DEPLOY / "example" / ".env.example").read_text()
    for name in required_env(text):
        assert re.search(rf"^{name}=", example_env, re.M), f"{name} missing from .env.example"
    raw = yaml.safe_load(text)
    assert str(raw["admin"]["token"]).startswith("${")
    assert all(str(d.get("api_key", "${")).startswith("${") for d in raw["destinations"])


def test_the_chart_refuses_several_replicas_on_sqlite() -> None:
    """The Deployment template fails the render for replicaCount > 1 with a SQLite store.
    No helm here: take the guard's pattern from the template and apply it as helm would."""
    text = (TEMPLATES / "deployment.yaml").read_text()
    guard = re.search(
        r'gt \(int \.Values\.replicaCount\) 1\) \(regexMatch "((?:[^"\\]|\\.)*)" \.Values\.config\)', text
    )
    assert guard is not None, "the SQLite replica guard is missing from deployment.yaml"
    assert "fail " in text[guard.end() : guard.end() + 200]
    pattern = re.compile(json.loads(f'"{guard.group(1)}"'))  # Go and JSON unescape alike here
    shipped = values()["config"]
    assert not pattern.search(shipped)  # the chart's own config uses PostgreSQL
    sqlite = re.sub(r'url: "postgresql://[^"]*"', 'url: "sqlite:////var/lib/bridge/bridge.db"', shipped)
    assert sqlite != shipped and pattern.search(sqlite)


# -- admin.metrics_token from a Secret -------------------------------------------------------
def with_metrics_token(key: str = "metrics-token") -> dict[str, Any]:
    vals = values()
    vals["metrics"]["token"]["key"] = key
    vals["metrics"]["serviceMonitor"]["enabled"] = True
    return vals


def test_the_metrics_token_is_off_by_default_and_never_inline() -> None:
    token = values()["metrics"]["token"]
    # Only where to find it: a Secret's name and key, no value a chart user could fill in.
    assert token == {"existingSecret": "", "key": ""}
    assert values()["metrics"]["serviceMonitor"]["enabled"] is False
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    assert ".Values.metrics.token.existingSecret | default .Values.secrets.existingSecret" in helpers


def test_the_metrics_token_goes_from_its_secret_key_into_the_pod_and_the_config() -> None:
    (dep,) = docs_of_kind("Deployment", with_metrics_token())
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    [env] = [e for e in container["env"] if e["name"] == "BRIDGE_METRICS_TOKEN"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "metrics-token" and "optional" not in ref  # a missing key stops the pod, loudly
    assert "value" not in env
    deployment_text = (TEMPLATES / "deployment.yaml").read_text()
    assert 'name: {{ include "bridge.metricsTokenSecret" . }}' in deployment_text
    # The chart's config reads it: with the variable set /metrics needs it, without it is open.
    text = values()["config"]
    assert "BRIDGE_METRICS_TOKEN" not in required_env(text)  # optional: the chart sets it only with a key
    for env_value, expected in (("s3cret-metrics", "s3cret-metrics"), (None, "")):
        env_vars = fake_env(text) | ({"BRIDGE_METRICS_TOKEN": env_value} if env_value else {})
        substituted, missing = substitute_env(text, env_vars)
        assert not missing
        assert build_config(yaml.safe_load(substituted), "values.yaml:config").metrics_token == expected


def test_the_servicemonitor_scrapes_metrics_with_the_token() -> None:
    (monitor,) = docs_of_kind("ServiceMonitor", with_metrics_token())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    (service,) = docs_of_kind("Service")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == values()["metrics"]["path"]
    auth = endpoint["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials"]["key"] == "metrics-token"
    text = (TEMPLATES / "servicemonitor.yaml").read_text()
    assert 'name: {{ include "bridge.metricsTokenSecret" . }}' in text  # the pod's Secret
    assert text.index("{{- if .Values.metrics.token.key }}") < text.index("authorization:")
    assert text.startswith("{{- if .Values.metrics.serviceMonitor.enabled }}")
    # The Service and the ServiceMonitor select by the same labels.
    assert 'include "bridge.selectorLabels"' in text


def test_the_chart_refuses_a_metrics_token_the_config_does_not_read() -> None:
    """Without helm: take the guard's condition from the template and apply it as helm would."""
    text = (TEMPLATES / "deployment.yaml").read_text()
    guard = re.search(r'if and \.Values\.metrics\.token\.key \(not \(contains "([^"]+)" \.Values\.config\)\)', text)
    assert guard is not None, "the metrics token guard is missing from deployment.yaml"
    assert "fail " in text[guard.end() : guard.end() + 200]
    needle = guard.group(1)
    shipped = values()["config"]
    assert needle in shipped  # the chart's own config reads the token
    assert needle not in re.sub(r"\n\s*metrics_token:[^\n]*", "", shipped)
