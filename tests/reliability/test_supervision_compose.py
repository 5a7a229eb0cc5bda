"""Supervision in the container topology (issue 20, item 1), checked statically since no container engine runs
here: every compose service restarts and has a health check, start order waits for health, and the workers'
health check (containers/healthcheck.py) tells a process connected to NATS from one that is not, against a real
nats-server."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHECK_IN_IMAGE = "/usr/local/bin/diffractflow-healthcheck.py"


def test_every_compose_service_restarts_and_has_a_health_check():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    for name, spec in services.items():
        assert spec.get("restart") in ("unless-stopped", "always"), name
        hc = spec.get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) > 1, name
        for key in ("interval", "timeout"):
            assert re.fullmatch(r"\d+s", hc[key]), (name, key, hc[key])
        assert int(hc["retries"]) >= 1, name
        deps = spec.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in services, (name, dep)
            assert cond["condition"] == "service_healthy", (name, dep)
        if CHECK_IN_IMAGE in hc["test"]:  # our script: it must be in the service's image, at that path
            text = (REPO / spec["build"]["dockerfile"]).read_text()
            assert f"COPY containers/healthcheck.py {CHECK_IN_IMAGE}" in text, name
    # what each check calls exists in its image: busybox wget (alpine nats), pg_isready, Prefect's python
    assert services["nats"]["image"].endswith("-alpine") and "8222" in " ".join(services["nats"]["healthcheck"]["test"])
    assert "http" in (REPO / "containers/nats/nats.conf").read_text()
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def _check(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPO / "containers" / "healthcheck.py"], capture_output=True, text=True,
                          env={"DIFFRACTFLOW_NATS_URL": url}, timeout=30)


def test_worker_health_check_follows_the_bus_connection(nats_server):
    """Unhealthy with no client connected to this server's port, healthy while one is, unhealthy again after."""
    from diffractflow import bus
    from diffractflow.config import Settings

    settings = Settings(nats_url=nats_server.url, nats_user="admin", nats_password=nats_server.creds.users["admin"])
    before = _check(nats_server.url)
    assert before.returncode == 1 and "no established connection" in before.stderr

    async def connected_check():
        nc = await bus.connect(settings, name="probe")
        try:
            return await asyncio.to_thread(_check, nats_server.url)
        finally:
            await nc.close()

    assert asyncio.run(connected_check()).returncode == 0
    assert _check(nats_server.url).returncode == 1
