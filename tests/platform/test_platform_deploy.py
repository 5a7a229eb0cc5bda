"""Containers and compose, checked statically (no container engine runs here), and the console scripts."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffractflow.natsserver import SERVICES, container_nats_conf, env_var_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def scripts() -> set[str]:
    import tomllib

    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def test_every_service_has_a_console_script_with_help_version_run_serve():
    assert scripts() == {*SERVICES, "diffractflow"}
    for s in SERVICES:
        out = subprocess.run([BIN / s, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert re.search(r"\brun\b", out.stdout) and re.search(r"\bserve\b", out.stdout), out.stdout
        ver = subprocess.run([BIN / s, "--version"], capture_output=True, text=True, timeout=120)
        assert ver.returncode == 0 and ver.stdout.strip() == f"{s} 0.1.0"
        serve = subprocess.run([BIN / s, "serve", "--help"], capture_output=True, text=True, timeout=120)
        assert serve.returncode == 0 and "NATS" in serve.stdout


def test_compose_is_consistent():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    svcs = compose["services"]
    assert {"nats", "postgres", "prefect-server", "orchestrator", *SERVICES} <= set(svcs)
    assert "-js" in " ".join(svcs["nats"]["command"]) or "jetstream" in (REPO / "containers/nats/nats.conf").read_text()
    volumes = set(compose["volumes"])
    for s in SERVICES:
        spec = svcs[s]
        dockerfile = REPO / spec["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        text = dockerfile.read_text()
        assert text.startswith("#") and "FROM debian:bookworm" in text
        assert f"DIFFRACTFLOW_SERVICE={s}" in text  # the entrypoint runs `<service> serve`
        needs_dials = s in ("stills-processor", "diffuse-extractor", "voxel-merger", "scaler")
        assert ("python3-dials" in text) == needs_dials, s
        assert "data:/data" in spec["volumes"] and "data" in volumes
        env = spec["environment"]
        assert env["DIFFRACTFLOW_VOLUME"] == "/data"
        assert env["DIFFRACTFLOW_NATS_USER"] == f"svc-{s}"
        assert env_var_for(f"svc-{s}") in env["DIFFRACTFLOW_NATS_PASSWORD"]
        assert env_var_for(f"svc-{s}") in svcs["nats"]["environment"]
        assert "replicas" in spec["deploy"]
        for src in re.findall(r"^COPY (\S+)", text, re.M):
            assert (REPO / src).exists(), f"{dockerfile}: COPY {src} does not exist"
    entry = (REPO / "containers/entrypoint.sh").read_text()
    assert 'exec "$DIFFRACTFLOW_SERVICE" serve' in entry
    orch = svcs["orchestrator"]
    assert orch["command"][0] == "watch"
    from orchestration.flows import FLOWS

    flow = orch["command"][orch["command"].index("--flow") + 1]
    assert flow in FLOWS
    assert "prefect-server" in orch["environment"]["PREFECT_API_URL"]
    assert "postgres" in svcs["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_container_nats_conf_is_current_and_valid(tmp_path):
    conf = (REPO / "containers/nats/nats.conf").read_text()
    assert conf == container_nats_conf(), "regenerate containers/nats/nats.conf with container_nats_conf()"
    local = conf.replace("/data/jetstream", str(tmp_path / "js")).replace("0.0.0.0", "127.0.0.1")
    (tmp_path / "t.conf").write_text(local)
    env = {env_var_for(u): "pw" for u in ["admin", *[f"svc-{s}" for s in SERVICES]]}
    out = subprocess.run([BIN / "nats-server", "-c", str(tmp_path / "t.conf"), "-t"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0, out.stderr + out.stdout


def test_compose_cluster_profile_is_current_and_complete():
    """`docker compose --profile cluster up` runs three JetStream nodes from the generated nats-cluster.conf; the
    workers take the node list from .env (`diffractflow compose-env --cluster`)."""
    import yaml

    from diffractflow.natsserver import CLUSTER_NODES, container_nats_cluster_conf

    conf = (REPO / "containers/nats/nats-cluster.conf").read_text()
    assert conf == container_nats_cluster_conf(), "regenerate containers/nats/nats-cluster.conf"
    svcs = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for node in CLUSTER_NODES:
        svc = svcs[node]
        assert svc["restart"] == "unless-stopped" and "healthcheck" in svc
        assert svc["environment"]["NATS_SERVER_NAME"] == node
        assert node == "nats" or (svc["profiles"] == ["cluster"] and svc["command"][-1].endswith("nats-cluster.conf"))
    assert "NATS_CONF" in " ".join(svcs["nats"]["command"])
    assert all("DIFFRACTFLOW_NATS_URLS" in str(s.get("environment", {}).get("DIFFRACTFLOW_NATS_URL", "DIFFRACTFLOW_NATS_URLS"))
               for s in svcs.values())
    env = subprocess.run([BIN / "diffractflow", "compose-env", "--cluster"], capture_output=True, text=True, timeout=60)
    assert env.returncode == 0, env.stderr
    lines = dict(line.split("=", 1) for line in env.stdout.splitlines())
    assert lines["NATS_CONF"] == "nats-cluster.conf" and lines["DIFFRACTFLOW_NATS_REPLICAS"] == "3"
    assert lines["DIFFRACTFLOW_NATS_URLS"].count("nats://") == 3 and len(lines["NATS_ROUTE_PASSWORD"]) > 20
