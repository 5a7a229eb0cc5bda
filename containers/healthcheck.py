"""Container health check of a diffractflow worker or the orchestrator: healthy while the container holds an
established TCP connection to the NATS server named by ``DIFFRACTFLOW_NATS_URL`` (the client reconnects
forever, so a worker cut off from the bus for longer than the check's retries is reported unhealthy).

Standard library only; reads the container's own ``/proc/net/tcp{,6}``. Exit 0 healthy, 1 not.
Usage: ``python3 healthcheck.py`` (compose runs it as the service's ``healthcheck``).
"""
from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

ESTABLISHED = "01"


def nats_port(url: str) -> int:
    first = url.split(",")[0].strip()
    return urlsplit(first).port or 4222


def established_remote_ports(paths=("/proc/net/tcp", "/proc/net/tcp6")) -> set[int]:
    """Remote ports of this network namespace's established TCP connections."""
    ports = set()
    for path in paths:
        try:
            with open(path) as f:
                next(f)  # header
                for line in f:
                    fields = line.split()
                    if fields[3] == ESTABLISHED:
                        ports.add(int(fields[2].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def main() -> int:
    url = os.environ.get("DIFFRACTFLOW_NATS_URL", "nats://nats:4222")
    port = nats_port(url)
    if port in established_remote_ports():
        return 0
    print(f"unhealthy: no established connection to the NATS server at {url}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
