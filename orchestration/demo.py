"""`diffractflow demo`: filled in as the services land (issue 10)."""
from __future__ import annotations


def run_demo(what, out, console) -> int:
    console.print("the demos are not built yet")
    return 1
