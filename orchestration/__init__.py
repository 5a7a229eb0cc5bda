"""Orchestration: Prefect flows that chain the services over the bus, the watcher/dispatcher and the operator CLI."""
