"""``diffractflow``: the operator's command line (embedded topology, queues, dead letters, watcher)."""
from __future__ import annotations

import asyncio
import json
import secrets
import signal
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from diffractflow import __version__, bus
from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.cli import run_and_exit
from diffractflow.messages import DeadLetter, JobRequest, new_id
from diffractflow.natsserver import CLUSTER_NODES, env_var_for

from .bluesky import serve as serve_bluesky
from .demo import run_demo
from .embedded import SERVICE_COMMANDS, SERVICES, Topology, _group_alive, default_home, nats_programs
from .gc import collect
from .process import ProcessError, process_diffuse
from .progress import RunProgress, logs_to_file
from .watcher import WatchRule, dispatch as run_dispatch, watch as run_watch

app = typer.Typer(name="diffractflow", help="Operate the diffractflow platform: start/stop the embedded topology, "
                  "inspect queues and dead letters, watch a directory for new data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
dlq_app = typer.Typer(help="Dead letters: jobs the services gave up on, with the reason.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
process_app = typer.Typer(help="Process files already on disk as one run, through the same flows and services "
                          "as live data.", no_args_is_help=True)
app.add_typer(process_app, name="process")
console = Console()

HomeOpt = typer.Option(None, "--home", envvar="DIFFRACTFLOW_HOME",
                       help="Run directory of the embedded topology (default ./.diffractflow).")


def _topo(home: Optional[Path]) -> Topology:
    return Topology(Path(home).resolve() if home else default_home())


def _version(value: bool):
    if value:
        typer.echo(f"diffractflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")):
    pass


@app.command()
def up(
    home: Optional[Path] = HomeOpt,
    service: List[str] = typer.Option(None, "--service", "-s", help="Services to start (default: all six)."),
    replicas: List[str] = typer.Option(None, "--replicas", "-r", help="SERVICE=N replicas, e.g. stills-processor=2."),
    volume: Optional[Path] = typer.Option(None, help="Shared volume root (default HOME/volume)."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Start Prefect's local server too."),
    cluster: bool = typer.Option(False, "--cluster", help="The bus as a three-node JetStream cluster on loopback "
                                 "(R3 streams; workers get every node and fail over) instead of one nats-server."),
):
    """Start the embedded topology: nats-server (JetStream, auth), the services' workers, Prefect's server.

    A supervisor process (in the background; `up` returns once everything serves) restarts any of them that dies,
    with backoff (a cluster node on its own ports and store); `status` shows the restart counts,
    HOME/logs/supervisor.log every death and restart."""
    services = list(service) if service else list(SERVICES)
    unknown = [s for s in services if s not in SERVICE_COMMANDS]
    if unknown:
        raise typer.BadParameter(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICE_COMMANDS)}")
    reps = {}
    for r in replicas or []:
        name, _, n = r.partition("=")
        if name not in services or not n.isdigit() or int(n) < 1:
            raise typer.BadParameter(f"--replicas {r!r}: expected SERVICE=N with a started service and N >= 1")
        reps[name] = int(n)
    topo = _topo(home)
    try:
        topo.up(services, reps, volume=volume, prefect=prefect, log=console.print, cluster=3 if cluster else 0)
    except Exception as exc:
        console.print(f"[red]up failed:[/red] {exc}; stopping what was started")
        topo.down(log=console.print)
        raise typer.Exit(1)
    console.print(f"[green]up[/green]: state in {topo.state_file}, supervised (restarts in `diffractflow status` and "
                  f"{topo.supervisor_log}); `diffractflow env` prints the client settings, `diffractflow down` stops "
                  "everything")


@app.command()
def down(home: Optional[Path] = HomeOpt):
    """Stop everything `up` started, supervisor included (SIGTERM, then SIGKILL after a grace period)."""
    left = _topo(home).down(log=console.print)
    if left:
        raise typer.Exit(1)


@app.command()
def env(home: Optional[Path] = HomeOpt):
    """Print shell exports that point clients (CLIs, Prefect, tests) at the running topology."""
    topo = _topo(home)
    state = topo.load()
    if not state:
        console.print("nothing is up", style="red")
        raise typer.Exit(1)
    typer.echo(f"export DIFFRACTFLOW_NATS_URL={state['nats']['url']}")
    typer.echo("export DIFFRACTFLOW_NATS_USER=admin")
    typer.echo(f"export DIFFRACTFLOW_NATS_PASSWORD_FILE={Path(state['credentials_dir']) / 'admin'}")
    typer.echo(f"export DIFFRACTFLOW_VOLUME={state['volume']}")
    if state.get("prefect"):
        typer.echo(f"export PREFECT_API_URL={state['prefect']['api_url']}")


@app.command()
def status(home: Optional[Path] = HomeOpt, runs: int = typer.Option(10, help="Recent flow runs to show.")):
    """Services (alive?), queue depths, dead letters and recent flow runs."""
    topo = _topo(home)
    state = topo.load()
    if not state:
        console.print("nothing is up (no state file in %s)" % topo.home)
        raise typer.Exit(1)
    topo.apply_env()

    sup = state.get("supervisor") or {}
    if sup.get("pid"):
        console.print(f"supervisor pid {sup['pid']} " + ("running" if _group_alive(sup["pid"]) else "[red]NOT running: "
                      "nothing is restarted[/red]") + f"; restarts logged in {sup.get('log', '?')}")
    t = Table(title="processes")
    for col in ("what", "pid", "alive", "restarts", "last exit"):
        t.add_column(col)

    def row(name: str, e: dict) -> None:
        t.add_row(name, str(e.get("pid") or "-"), _yes(bool(e.get("pid")) and _group_alive(e["pid"])),
                  str(e.get("restarts", 0)), e.get("last_exit", ""))

    for name, entry in nats_programs(state):  # one nats-server, or a cluster's nodes (nats-n1 ...)
        row(name if name == "nats-server" else f"{name} {entry['url']}", entry)
    if state.get("prefect"):
        row("prefect server", state["prefect"])
    for s in state["services"]:
        row(f"{s['service']}[{s['replica']}]", s)
    console.print(t)
    services = sorted({s["service"] for s in state["services"]})
    queues, dead = asyncio.run(_queues(topo, services))
    q = Table(title="queues")
    for col in ("service", "pending", "in progress", "redelivered", "waiting pulls"):
        q.add_column(col)
    for st in queues:
        q.add_row(st.service, str(st.pending), str(st.ack_pending), str(st.redelivered), str(st.waiting))
    console.print(q)
    console.print(f"dead letters: {dead}")
    if state.get("prefect"):
        api = state["prefect"].get("api_url", "")
        if api:
            console.print(f"Prefect UI (run history, flow and task runs, logs): {api.rsplit('/api', 1)[0]}")
        try:
            with topo.prefect_settings():
                console.print(_flow_runs_table(runs))
        except Exception as exc:  # the server may still be starting
            console.print(f"flow runs unavailable: {exc}")


def _yes(b: bool) -> str:
    return "[green]yes[/green]" if b else "[red]no[/red]"


async def _queues(topo: Topology, services):
    nc = await bus.connect(topo.settings(), name="status")
    js = nc.jetstream()
    try:
        out = [st for s in services if (st := await bus.queue_status(js, s))]
        info = await js.stream_info(bus.DLQ)
        return out, info.state.messages
    finally:
        await nc.drain()


def _flow_runs_table(limit: int) -> Table:
    # prefect's client (~1 s) only for the flow-run table
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async def _read():
        async with get_client() as client:
            return await client.read_flow_runs(limit=limit, sort=FlowRunSort.START_TIME_DESC)

    t = Table(title="recent flow runs")
    for col in ("name", "state", "start", "seconds"):
        t.add_column(col)
    for fr in asyncio.run(_read()):
        t.add_row(fr.name, fr.state.name if fr.state else "?", str(fr.start_time or ""),
                  f"{fr.total_run_time.total_seconds():.1f}" if fr.total_run_time else "")
    return t


# ------------------------------------------------------------------------ dead letters
@dlq_app.command("list")
def dlq_list(home: Optional[Path] = HomeOpt, service: Optional[str] = typer.Option(None, help="Only this service."),
             limit: int = typer.Option(50), as_json: bool = typer.Option(False, "--json")):
    """List dead letters (sequence, service, kind, job, reason)."""
    rows = asyncio.run(_dlq_rows(_topo(home), service, limit))
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    t = Table(title="dead letters")
    for col in ("seq", "service", "kind", "job_id", "reason"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["seq"]), str(r.get("service")), str(r.get("kind")), str(r.get("job_id") or ""),
                  str(r.get("reason"))[:100])
    console.print(t)


async def _dlq_rows(topo: Topology, service, limit):
    nc = await bus.connect(topo.settings(), name="dlq")
    js = nc.jetstream()
    rows = []
    try:
        async for seq, subject, data in bus.iter_stream(js, bus.DLQ, limit=100000):
            try:
                row = bus.describe_dead_letter(subject, data)
            except Exception as exc:
                row = {"service": "?", "kind": "unreadable", "reason": str(exc)}
            if service and row.get("service") != service:
                continue
            row["seq"] = seq
            rows.append(row)
            if len(rows) >= limit:
                break
    finally:
        await nc.drain()
    return rows


@dlq_app.command("show")
def dlq_show(seq: int, home: Optional[Path] = HomeOpt):
    """Show one dead letter in full."""
    rows = [r for r in asyncio.run(_dlq_rows(_topo(home), None, 100000)) if r["seq"] == seq]
    if not rows:
        console.print(f"no dead letter with sequence {seq}", style="red")
        raise typer.Exit(1)
    typer.echo(json.dumps(rows[0], indent=2, default=str))


@dlq_app.command("reinject")
def dlq_reinject(seq: int, home: Optional[Path] = HomeOpt):
    """Put a dead-lettered job back on its service's queue (as the next attempt) and remove the letter."""
    job_id = asyncio.run(_reinject(_topo(home), seq))
    console.print(f"re-injected job {job_id}")


async def _reinject(topo: Topology, seq: int) -> str:
    nc = await bus.connect(topo.settings(), name="dlq")
    js = nc.jetstream()
    try:
        msg = await js.get_msg(bus.DLQ, seq)
        if msg.subject.startswith("$JS.EVENT.ADVISORY"):
            adv = json.loads(msg.data)
            orig = await js.get_msg(bus.JOBS, adv["stream_seq"])
            job = JobRequest.from_bytes(orig.data)
            await js.delete_msg(bus.JOBS, adv["stream_seq"])
        else:
            letter = DeadLetter.from_bytes(msg.data)
            job = JobRequest.from_bytes(letter.raw.encode())
        job = job.model_copy(update={"attempt": job.attempt + 1})
        await bus.publish_job(js, job)
        await js.delete_msg(bus.DLQ, seq)
        return job.job_id
    finally:
        await nc.drain()


# ------------------------------------------------------------------------ jobs and data
@app.command()
def submit(
    service: str,
    input: List[str] = typer.Option(None, "--input", "-i", help="NAME=PATH (absolute, or relative to the volume)."),
    param: List[str] = typer.Option(None, "--param", "-p", help="KEY=VALUE (VALUE parsed as JSON when it can be)."),
    job_id: Optional[str] = typer.Option(None, help="Default: a new id."),
    run_id: str = typer.Option("adhoc"),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the result."),
    home: Optional[Path] = HomeOpt,
):
    """Submit one job to a service on the bus and print its result (debugging)."""
    # tasks, flows and diffuse import prefect (~1 s): only for the commands that run flows, not for --help
    from .tasks import JobRejected, StageFailed, submit_and_wait

    topo = _topo(home)
    topo.apply_env()
    inputs = dict(_kv(i, "--input") for i in input or [])
    params = {k: _json_or_str(v) for k, v in (_kv(p, "--param") for p in param or [])}
    try:
        res = asyncio.run(submit_and_wait(service, inputs, params, run_id=run_id, job_id=job_id or new_id("job-"),
                                          timeout=timeout, settings=topo.settings()))
    except (JobRejected, StageFailed) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1)
    typer.echo(res.model_dump_json(indent=2))


def _kv(s: str, opt: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep or not k:
        raise typer.BadParameter(f"{opt} {s!r}: expected NAME=VALUE")
    return k, v


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


@app.command()
def watch(
    directory: Path = typer.Argument(..., help="Incoming directory (must be on the shared volume)."),
    run_id: str = typer.Option(..., help="The run these files belong to."),
    flow: str = typer.Option("echo", help="Flow to run per file (see orchestration.flows.FLOWS)."),
    pattern: str = typer.Option("*", help="Only files matching this glob."),
    expected: Optional[int] = typer.Option(None, help="The run is complete after this many files."),
    quiet_timeout: Optional[float] = typer.Option(None, help="...or after this many seconds without a new file."),
    settle: float = typer.Option(1.0, help="Seconds a file's size must be stable before it counts as landed."),
    dispatch: bool = typer.Option(True, "--dispatch/--no-dispatch", help="Also turn events into flow runs here."),
    config: Optional[Path] = typer.Option(None, "--config", help="Run configuration (JSON or YAML) for the flow, "
                                          "e.g. space_group, unit_cell, d_min, symmetry, formula for diffuse-pipeline; "
                                          "stored as runs/RUN/config.json on the volume."),
    home: Optional[Path] = HomeOpt,
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show the flows' log lines live instead of one "
                                 "progress display (diffuse-pipeline; otherwise in HOME/logs/flows-RUN.log)."),
):
    """Watch DIRECTORY: each new file becomes an event on the bus, and (with --dispatch) a flow run.

    Real data, e.g. thaumatin stills into the diffuse pipeline:
    diffractflow watch VOLUME/incoming/thau --run-id thau --flow diffuse-pipeline --pattern '*.cbf' --config thau.yaml
    with thau.yaml holding space_group: P41212, unit_cell: [57.8, 57.8, 150.3, 90, 90, 90], d_min: 3.0.
    """
    # flows import prefect (see submit)
    from .flows import FLOWS

    if flow not in FLOWS:
        raise typer.BadParameter(f"unknown flow {flow!r}; known: {', '.join(FLOWS)}")
    if not directory.is_dir():
        raise typer.BadParameter(f"{directory} is not a directory")
    topo = _topo(home)
    topo.apply_env()
    settings = topo.settings()
    if config is not None:
        _store_run_config(settings, run_id, config)
    rule = WatchRule(directory.resolve(), run_id, pattern, settle, expected, quiet_timeout)
    on_file, on_end = FLOWS[flow]

    async def _main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(run_watch(rule, settings, stop))]
        prog = shown = None
        if dispatch:
            tasks.append(asyncio.create_task(run_dispatch(settings, on_file, on_end, stop)))
            if flow == "diffuse-pipeline" and not verbose:
                root = directory.resolve()
                prog = RunProgress(console, settings.volume, run_id, expected,
                                   landed_fn=lambda: sum(1 for f in root.glob(pattern)
                                                         if f.is_file() and not f.name.startswith(".")))
                shown = asyncio.create_task(prog.run())
        await tasks[0]
        console.print(f"watch of {directory} ended (run {run_id})")
        if dispatch:
            await _drain_events(settings, stop)
            stop.set()
            await tasks[1]
        if prog is not None:
            prog.stop()
            await shown

    quiet = flow == "diffuse-pipeline" and dispatch and not verbose
    with topo.prefect_settings(), logs_to_file(topo.home / "logs" / f"flows-{run_id}.log",
                                               verbose=not quiet):
        asyncio.run(_main())


def _store_run_config(settings, run_id: str, config: Path) -> None:
    """Validate a run configuration and store it where the flows look for it."""
    # diffuse imports prefect (see submit)
    from .diffuse import DiffuseRunConfig, run_dir

    try:
        data = yaml.safe_load(config.read_text()) or {}
        cfg = DiffuseRunConfig.model_validate(data)
    except Exception as exc:
        raise typer.BadParameter(f"{config}: {exc}") from exc
    atomic_write_json(run_dir(Volume(settings.volume), run_id) / "config.json", cfg.model_dump())


async def _drain_events(settings, stop, poll: float = 0.5):
    """Wait until the dispatcher has taken (and acked) every event."""
    nc = await bus.connect(settings, name="watch-drain")
    js = nc.jetstream()
    try:
        while not stop.is_set():
            info = await js.consumer_info(bus.EVENTS, "dispatcher")
            if not info.num_pending and not info.num_ack_pending:
                return
            await asyncio.sleep(poll)
    finally:
        await nc.drain()


@app.command("serve-flows")
def serve_flows(home: Optional[Path] = HomeOpt, limit: int = typer.Option(8, help="Flow runs at once.")):
    """Serve the flows as Prefect deployments (echo-file, diffuse-still, diffuse-merge) until Ctrl-C.

    Start runs from Prefect's UI or `prefect deployment run diffuse-merge/diffuse-merge -p run_id=RUN`.
    """
    # prefect (see submit)
    from prefect import serve

    from .diffuse import diffuse_merge_flow, diffuse_still_flow
    from .flows import echo_file_flow

    topo = _topo(home)
    topo.apply_env()
    with topo.prefect_settings():
        serve(echo_file_flow.to_deployment(name="echo-file"),
              diffuse_still_flow.to_deployment(name="diffuse-still"),
              diffuse_merge_flow.to_deployment(name="diffuse-merge"), limit=limit)


@process_app.command("diffuse")
def process_diffuse_cmd(
    directory: Path = typer.Argument(..., help="Directory holding the stills (CBF or any format dxtbx reads)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Run configuration (YAML or JSON): space_group, "
                                          "unit_cell (Å, °), d_min (Å), subdivisions, symmetry, formula, extractor "
                                          "and stills-processor parameters; see orchestration/diffuse.py:DiffuseRunConfig."),
    out: Path = typer.Option(..., "--out", help="Where summary.json, the merged NeXus map and the figures go."),
    pattern: str = typer.Option("*.cbf", help="Glob of the stills inside DIRECTORY."),
    background: Optional[str] = typer.Option(None, help="Glob (inside DIRECTORY) of background-only frames: same "
                                             "geometry, no crystal. Averaged, smoothed and subtracted from every still."),
    run_id: Optional[str] = typer.Option(None, help="Run id (default: the directory's name)."),
    space_group: Optional[str] = typer.Option(None, help="Overrides the configuration's space_group."),
    unit_cell: Optional[str] = typer.Option(None, help="Overrides the configuration's unit_cell: a,b,c,al,be,ga (Å, °)."),
    d_min: Optional[float] = typer.Option(None, help="Overrides the configuration's d_min (Å)."),
    home: Optional[Path] = typer.Option(None, "--home", envvar="DIFFRACTFLOW_HOME",
                                        help="Use the topology already up there; otherwise one is started in "
                                        "OUT/.diffractflow for this run and stopped after it."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show Prefect's flow and task log lines live "
                                 "instead of one progress display (otherwise they go to HOME/logs/flows-RUN.log)."),
    rerun: bool = typer.Option(False, "--rerun", help="Process a run that already has results again (after changing "
                               "its configuration, or with more files): unchanged work is reused, changed work runs "
                               "anew; the previous output is kept beside it."),
):
    """Process a whole diffuse run from files on disk: stills -> DIALS -> diffuse extraction -> voxels -> scaling
    -> merged map, through the watcher, Prefect flows and services exactly as live data.

    Example: diffractflow process diffuse /data/thau --config thau.yaml --out thau-out
    """
    cell = None
    if unit_cell:
        try:
            cell = [float(x) for x in unit_cell.replace(" ", ",").split(",") if x]
        except ValueError:
            raise typer.BadParameter(f"--unit-cell {unit_cell!r}: expected six numbers a,b,c,alpha,beta,gamma")
    try:
        summary = process_diffuse(directory, out, console, config=config, pattern=pattern, background=background,
                                  run_id=run_id, home=home, verbose=verbose, rerun=rerun,
                                  config_overrides={"space_group": space_group, "unit_cell": cell, "d_min": d_min})
    except ProcessError as exc:
        console.print(f"[red]process diffuse:[/red] {exc}")
        raise typer.Exit(2)
    brief = {k: summary[k] for k in ("stills_total", "stills_processed", "stills_failed", "cc_half_overall",
                                     "background", "wall_seconds")}
    console.print_json(json.dumps(brief))
    console.print(f"summary, merged map and figures: {summary['outputs']}")
    if summary["stills_processed"] == 0:
        raise typer.Exit(1)


@app.command("compose-env")
def compose_env(cluster: bool = typer.Option(False, "--cluster", help="Also the settings of the three-node "
                                             "JetStream cluster (docker compose --profile cluster up): R3 streams.")):
    """Print a fresh .env for compose.yaml: random passwords for NATS users and PostgreSQL."""
    for user in ["admin", *[f"svc-{s}" for s in SERVICES]]:
        typer.echo(f"{env_var_for(user)}={secrets.token_urlsafe(24)}")
    typer.echo(f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}")
    if cluster:
        typer.echo("NATS_CONF=nats-cluster.conf")
        typer.echo(f"NATS_ROUTE_PASSWORD={secrets.token_urlsafe(24)}")
        typer.echo("DIFFRACTFLOW_NATS_URLS=" + ",".join(f"nats://{n}:4222" for n in CLUSTER_NODES))
        typer.echo("DIFFRACTFLOW_NATS_REPLICAS=3")


@app.command()
def demo(
    what: str = typer.Argument("all", help="all | diffuse | stem | refine"),
    out: Path = typer.Option(Path("demo-output"), help="Where the demo's outputs go."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show the flows' log lines live instead of one "
                                 "progress display."),
):
    """Run the platform's demos on embedded defaults (what `make demo` runs)."""
    raise typer.Exit(run_demo(what, out.resolve(), console, verbose=verbose))


@app.command()
def gc(
    home: Optional[Path] = typer.Option(None, "--home", envvar="DIFFRACTFLOW_HOME", help="Topology directory (its volume)."),
    volume: Optional[Path] = typer.Option(None, "--volume", help="The volume directly (instead of --home)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    min_age_s: float = typer.Option(3600.0, "--min-age", help="Keep job directories changed within this many "
                                    "seconds (a run still collecting may not have recorded them yet)."),
):
    """Remove job outputs no run references (old results of re-runs with another config or input set)."""
    if volume is None:
        topo = Topology(home or default_home())
        state = topo.load()
        volume = Path(state["volume"]) if state and state.get("volume") else (home or default_home()) / "volume"
    if not volume.is_dir():
        console.print(f"[red]gc: {volume} is not a directory[/red]")
        raise typer.Exit(2)
    rep = collect(volume, dry_run=dry_run, min_age_s=min_age_s)
    for d in rep.removed:
        console.print(("would remove " if dry_run else "removed ") + d)
    console.print(f"{len(rep.removed)} job directories {'to remove' if dry_run else 'removed'} "
                  f"({rep.bytes_freed / 1e6:.1f} MB); kept {rep.kept_referenced} referenced, {rep.kept_recent} recent")


@app.command("bluesky")
def bluesky_cmd(
    flow: str = typer.Option("diffuse-pipeline", help="Flow for each opted-in run (orchestration.flows.FLOWS)."),
    source: Optional[str] = typer.Option(None, help="Only this RunEngine's documents (events.bluesky.SOURCE.*)."),
    settle: float = typer.Option(1.0, help="Seconds a frame file's size must be stable before it counts as written."),
    frame_timeout: float = typer.Option(300.0, help="Seconds to wait for a frame's file before recording it missing."),
    root_map: List[str] = typer.Option([], "--root-map", help="DETECTOR_ROOT=LOCAL_PATH (repeatable): where the "
                                      "detector host's file paths are on this machine."),
    all_runs: bool = typer.Option(False, "--all-runs", help="Also runs without diffractflow metadata."),
    home: Optional[Path] = HomeOpt,
):
    """Process Bluesky runs: a RunEngine's documents (published by bluesky-nats as user `bluesky`) open a run,
    name its frames and end it; file events keep working."""
    topo = _topo(home)
    topo.apply_env()
    settings = topo.settings()
    rmap = dict(_kv(r, "--root-map") for r in root_map)

    async def _main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_bluesky(settings, flow, stop, source=source, require_md=not all_runs, settle_s=settle,
                            frame_timeout_s=frame_timeout, root_map=rmap)

    with topo.prefect_settings():
        asyncio.run(_main())


from .report import register as _register_report  # noqa: E402 - the report command lives beside its code

_register_report(app)


def main():  # pragma: no cover - the console script; tests call `app` (in process) or the installed program
    """The ``diffractflow`` program: the app, then an exit without the interpreter's module teardown."""
    run_and_exit(app)


if __name__ == "__main__":  # pragma: no cover
    app()
