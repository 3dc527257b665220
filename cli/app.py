"""The `evo` command line: a thin typer layer over evo.Client.

Output for people goes to stdout (ids, tables, events); diagnostics go to stderr.
Exit codes: 0 ok, 1 a job or check failed (or no broker answered), 2 bad input.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import Optional

import msgspec
import typer

from evo.errors import BadInput, EvoError
from evo.home import evo_home

def _flags_without_metavar() -> None:
    """Help shows `--wait`, not `--wait <bool>`: a flag takes no value (typer prints its type)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:  # a typer that prints no type for a flag
        return

    def display(self, ctx):  # noqa: ANN001, ANN202
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    setattr(TyperOption, "display_type_rich", display)  # noqa: B010 - not in every typer


_flags_without_metavar()
# markdown: a docstring's first paragraph reads as one line in the command list
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="evo: event-sourced orchestration of ML training across machines.")

BrokerOpt = typer.Option(None, "--broker", help="broker address (else EVO_BROKER, else EVO_HOME/broker.json)")


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _client(broker: str | None, timeout_s: float | None = None):
    from evo.client import Client

    if timeout_s is None:
        timeout_s = float(os.environ.get("EVO_TIMEOUT_S", "10"))
    return Client(broker, timeout_s=timeout_s)


def _version(value: bool) -> None:
    if value:
        from evo import __version__

        typer.echo(f"evo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(home: Optional[Path] = typer.Option(None, "--home", envvar="EVO_HOME",
                                              help="evo's home folder (default ./.evo)"),
          key: Optional[Path] = typer.Option(None, "--key-file", envvar="EVO_KEY",
                                             help="key file for a broker with keys (`evo keys "
                                             "issue`); default: this machine's own"),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print evo's version and exit")) -> None:
    if home is not None:
        os.environ["EVO_HOME"] = str(home)
    if key is not None:
        os.environ["EVO_KEY"] = str(key)


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# --- daemons ----------------------------------------------------------------------------------


@app.command()
def broker(
    bind: str = typer.Option("tcp://127.0.0.1:*", "--bind",
                             help="ROUTER address; `*` as port picks a free one"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", help="routing rules (default "
                                           "EVO_HOME/cluster.yaml, else the packaged one)"),
    no_sync: bool = typer.Option(False, "--no-sync", help="skip fdatasync (tests only: unsafe)"),
    segment_bytes: Optional[int] = typer.Option(None, "--segment-bytes", hidden=True,
                                                help="rotate log segments at this size (tests)"),
    notify: Optional[str] = typer.Option(
        None, "--notify", help="a command run with the event as JSON on stdin when a node is "
        "lost, a job fails for good or a sweep completes (split like a shell, never run by one)"),
) -> None:
    """Run the broker in the foreground (Ctrl-C stops it cleanly)."""
    from evo.broker.cluster import load_cluster
    from evo.broker.notify import parse_command
    from evo.broker.server import run_broker
    from evo.home import normalize_address

    _setup_logging()
    rules = load_cluster(cluster, evo_home())  # bad file: exit 2 before binding anything
    argv = parse_command(notify) if notify is not None else None
    run_broker(evo_home(), normalize_address(bind), sync=not no_sync, cluster=rules,
               segment_bytes=segment_bytes, notify=argv)


def _labels(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


keys_app = typer.Typer(help="CURVE keys: the broker's, and one file per machine that may "
                       "connect (a non-loopback --bind needs them).")
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init() -> None:
    """Make the broker's key pair, the authorized-keys folder and this machine's own key."""
    from evo.keys import init

    typer.echo(f"keys in {init(evo_home())}; `evo keys issue NAME` makes one for a machine")


@keys_app.command("issue")
def keys_issue(name: str = typer.Argument(..., help="the machine's (or node's) name"),
               out: Optional[Path] = typer.Option(None, "--out", help="default ./NAME.key")) -> None:
    """Make and authorize a key for NAME; writes the one file to copy to that machine."""
    from evo.keys import issue

    path = issue(evo_home(), name, out)
    typer.echo(f"{path}: copy it to {name} and run `evo --key-file {path.name} node --broker "
               "tcp://HOST:PORT` there (or set EVO_KEY); keep it private")


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(...)) -> None:
    """Take NAME's key back: a running broker refuses it from its next message."""
    from evo.keys import revoke

    revoke(evo_home(), name)
    typer.echo(f"revoked {name}")


@keys_app.command("list")
def keys_list() -> None:
    """Every key issued, authorized or revoked."""
    from evo.keys import has_keys, keys_dir, listing

    if not has_keys(evo_home()):
        raise BadInput(f"no keys in {keys_dir(evo_home())}: run `evo keys init`")
    for name, state, public in listing(evo_home()):
        typer.echo(f"{name:<24} {state:<10} {public}")


node_app = typer.Typer(help="Run a node daemon (no subcommand), or drain or resume one.")
app.add_typer(node_app, name="node")


@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    name: Optional[str] = typer.Option(None, "--name", help="default: the hostname"),
    labels: Optional[str] = typer.Option(None, "--labels", help="a,b (routing rules match these)"),
    slots: Optional[int] = typer.Option(None, "--slots", help="jobs at once (default: cores)"),
    cpus: Optional[float] = typer.Option(None, "--cpus"),
    mem_gb: Optional[float] = typer.Option(None, "--mem-gb"),
    gpus: Optional[int] = typer.Option(None, "--gpus"),
    vram_gb: Optional[float] = typer.Option(None, "--vram-gb", help="per GPU"),
    heartbeat_s: float = typer.Option(2.0, "--heartbeat-s"),
    lease_ahead: Optional[int] = typer.Option(
        None, "--lease-ahead", help="short trials queued here beyond free slots (default 4 x slots; 0: off)"),
    cache_gb: float = typer.Option(20.0, "--cache-gb", help="bound of the cache of jobs' files (EVO_HOME/cache)"),
    slurm: bool = typer.Option(False, "--slurm", help="submit Slurm pilots that each run a node"),
    partition: Optional[str] = typer.Option(None, "--partition", help="--slurm: the partition"),
    nodes: int = typer.Option(1, "--nodes", help="--slurm: machines per pilot"),
    cpus_per_node: Optional[int] = typer.Option(None, "--cpus-per-node", help="--slurm"),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", help="--slurm"),
    walltime: str = typer.Option("1:00:00", "--time", help="--slurm: each pilot's walltime"),
    sbatch_arg: list[str] = typer.Option([], "--sbatch-arg", help="--slurm: passed to sbatch"),
    scale: int = typer.Option(1, "--scale", help="--slurm: pilots kept alive while there is work"),
    until: float = typer.Option(0.0, "--until", help="when this node's allocation ends (epoch s)"),
    grace_s: float = typer.Option(60.0, "--grace-s",
                                  help="stop this long before --until (pilots: before the walltime)"),
    idle_exit_s: Optional[float] = typer.Option(
        None, "--idle-exit-s", help="leave after this long with nothing to do (pilots: 120)"),
    broker: Optional[str] = BrokerOpt,
) -> None:
    """Run a node daemon: lease the jobs that fit this machine, run them, report back.

    Declared values override the probe (reserve headroom, or simulate a machine).
    `evo node drain NAME` / `evo node resume NAME` stop and restart a node taking work.
    With --slurm, submit pilot jobs instead, each running a node on a compute node, and keep
    --scale of them while there is work; Ctrl-C cancels them."""
    if ctx.invoked_subcommand is not None:
        return
    from evo.home import find_broker, normalize_address
    from evo.nodes.daemon import run_node

    for flag, value, least in (("--slots", slots, 1), ("--cpus", cpus, 0), ("--mem-gb", mem_gb, 0),
                               ("--gpus", gpus, 0), ("--vram-gb", vram_gb, 0),
                               ("--lease-ahead", lease_ahead, 0), ("--heartbeat-s", heartbeat_s, 0.01),
                               ("--cache-gb", cache_gb, 0), ("--nodes", nodes, 1),
                               ("--cpus-per-node", cpus_per_node, 1),
                               ("--gpus-per-node", gpus_per_node, 0), ("--scale", scale, 1),
                               ("--until", until, 0), ("--grace-s", grace_s, 0),
                               ("--idle-exit-s", idle_exit_s, 0)):
        if value is not None and not value >= least:  # not >=: NaN is refused too
            raise BadInput(f"{flag}: expected >= {least}, got {value}")
    _setup_logging()
    address = find_broker(broker)  # none to be found: say so now, not in a retry loop
    if slurm:
        _slurm_pilots(address, partition=partition, nodes=nodes, cpus_per_node=cpus_per_node,
                      gpus_per_node=gpus_per_node, mem_gb=mem_gb, walltime=walltime,
                      sbatch_args=sbatch_arg, scale=scale, labels=_labels(labels), slots=slots,
                      grace_s=grace_s, heartbeat_s=heartbeat_s,
                      idle_exit_s=120.0 if idle_exit_s is None else idle_exit_s)
        return
    if until and until - grace_s <= time.time():
        raise BadInput(f"--until: the allocation ends in {until - time.time():.0f}s, within "
                       f"--grace-s {grace_s:g}: nothing could run")
    # Without an explicit address the node looks again at each reconnect, so it finds a
    # broker that restarted on another port (EVO_HOME/broker.json).
    run_node(normalize_address(broker) if broker else None, name=name, labels=_labels(labels),
             slots=slots, cpus=cpus,
             mem_gb=mem_gb, gpus=gpus, vram_gb=vram_gb, heartbeat_s=heartbeat_s,
             lease_ahead=lease_ahead, cache_gb=cache_gb, until=until, grace_s=grace_s,
             idle_exit_s=idle_exit_s or 0.0)


def _slurm_pilots(address: str, *, scale: int, walltime: str, **kw) -> None:  # noqa: ANN003
    """`evo node --slurm`: the keeper of pilots, in the foreground until Ctrl-C or SIGTERM."""
    import signal

    from evo.nodes.pilots import Keeper, PilotSpec, walltime_s, work_waiting

    walltime_s(walltime)  # a bad --time: one line, before anything is submitted
    spec = PilotSpec(broker=address, home=evo_home().absolute(), time=walltime, **kw)
    keeper = Keeper(spec, scale, work_waiting(address, walltime_s(walltime) - spec.grace_s))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: keeper.stop.set())
    typer.echo(f"keeping {scale} Slurm pilot(s) of {walltime} while there is work "
               f"(script: {keeper.script_path}); Ctrl-C cancels them", err=True)
    keeper.run()


def _changed(reply, what: str, already: str) -> None:  # noqa: ANN001
    typer.echo(f"{what}: {' '.join(reply.ids)}" if reply.ids else already)


@node_app.command("drain")
def node_drain(name: str = typer.Argument(..., help="a node's name"),
               broker: Optional[str] = BrokerOpt) -> None:
    """The node finishes what it runs and takes nothing new, until `evo node resume`."""
    from evo.broker import protocol as p

    with _client(broker) as c:
        _changed(c.request(p.Drain(node=name)), "drained", f"{name} was drained already")


@node_app.command("resume")
def node_resume(name: str = typer.Argument(..., help="a node's name"),
                broker: Optional[str] = BrokerOpt) -> None:
    """A drained node takes work again."""
    from evo.broker import protocol as p

    with _client(broker) as c:
        _changed(c.request(p.Drain(node=name, resume=True)), "resumed",
                 f"{name} was not drained")


@app.command()
def hold(target: str = typer.Argument(..., help="a queued job, or a sweep (its queued jobs)"),
         broker: Optional[str] = BrokerOpt) -> None:
    """Keep queued jobs from starting until `evo release`."""
    from evo.broker import protocol as p

    with _client(broker) as c:
        _changed(c.request(p.Hold(target=target)), "held", f"nothing to hold in {target}")


@app.command()
def release(target: str = typer.Argument(..., help="a held job, or a sweep"),
            broker: Optional[str] = BrokerOpt) -> None:
    """Let held jobs run."""
    from evo.broker import protocol as p

    with _client(broker) as c:
        _changed(c.request(p.Hold(target=target, release=True)), "released",
                 f"nothing held in {target}")


@app.command()
def up(
    slots: Optional[int] = typer.Option(None, "--slots", help="local node's slots (default: cores)"),
    labels: Optional[str] = typer.Option("cpu", "--labels"),
    gpus: Optional[int] = typer.Option(None, "--gpus"),
) -> None:
    """Embedded broker and a local node in the foreground: zero setup. Ctrl-C stops both."""
    from evo.broker.cluster import load_cluster
    from evo.broker.server import Broker, broker_collector, collector_paused
    from evo.nodes.daemon import NodeDaemon
    import threading

    _setup_logging()
    with collector_paused():
        b = Broker(evo_home(), cluster=load_cluster(None, evo_home()))
    t = threading.Thread(target=b.serve_forever, daemon=True)
    t.start()
    n = NodeDaemon(b.address, name="local", labels=_labels(labels), slots=slots, gpus=gpus)
    stop = lambda *_: n.stop(drain=False)  # noqa: E731
    import signal as _signal

    _signal.signal(_signal.SIGINT, stop)
    _signal.signal(_signal.SIGTERM, stop)
    typer.echo(f"evo up: broker {b.address}, node 'local' with {n.slots} slot(s); Ctrl-C stops",
               err=True)
    try:
        with broker_collector():
            n.run()
    finally:
        b.stop()
        t.join(10)


@app.command()
def ui(port: int = typer.Option(8765, "--port", help="the page's port (0: a free one)"),
       bind: str = typer.Option("127.0.0.1", "--bind", help="the address to listen on; off "
                                "loopback the page needs its token"),
       token: Optional[str] = typer.Option(None, "--token", envvar="EVO_UI_TOKEN",
                                           help="the page's token (default: a new one, printed, "
                                           "when not on loopback)"),
       open_: bool = typer.Option(False, "--open", help="open the page in a browser"),
       broker: Optional[str] = BrokerOpt) -> None:
    """A read-only web page over the projections, live from the event relay (Ctrl-C stops)."""
    import ipaddress
    import secrets
    import socket

    from evo.errors import BadInput

    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(bind)).is_loopback
    except (OSError, ValueError):
        raise BadInput(f"--bind: {bind!r} is not an address of this machine") from None
    if not loopback and not token:
        token = secrets.token_urlsafe(18)
    from evo.ui.app import LOOPBACK, TOKEN_CHARS

    if token is not None and (not token or not set(token) <= TOKEN_CHARS):
        raise BadInput("--token: use letters, digits, '-' and '_' only (it goes in a URL and "
                       "a cookie)")
    if not 0 <= port <= 65535:
        raise BadInput(f"--port: {port} is not a port (0-65535)")
    from evo.errors import EvoError

    # A broker that is not up yet (started beside the page, or restarting) is waited for:
    # the page says "broker away" until one answers, and finds it then.
    try:
        with _client(broker, timeout_s=2) as c:
            c.hello()
            address = f"broker {c.address}"
    except EvoError as exc:
        address = f"no broker answers yet: {exc}; the page says so until one does"
    import uvicorn

    from evo.ui.app import make_app

    # on loopback, only loopback's names (another site's name pointed at 127.0.0.1 is
    # refused); elsewhere the token guards the page, under whatever name reaches it
    # the broker as given (else found anew from EVO_HOME after a restart)
    app_ = make_app(broker, token=token, hosts=LOOPBACK if loopback else ["*"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        raise BadInput(f"--port {port}: cannot listen on {bind}:{port} ({exc.strerror})") from None
    sock.listen(128)  # a browser that comes early waits for the server instead of a refusal
    url = f"http://{bind}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    typer.echo(f"evo ui: {url} ({address}; Ctrl-C stops)", err=True)
    if open_:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app_, log_level="warning", timeout_graceful_shutdown=1,
                            access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@app.command()
def why(job: str = typer.Argument(...), broker: Optional[str] = BrokerOpt) -> None:
    """Why a job waits, naming the nodes and what each one lacks."""
    from evo.broker import protocol as p

    with _client(broker) as c:
        reply = c.request(p.Why(job_id=job))
    typer.echo(reply.text)  # type: ignore[attr-defined]


# --- jobs -------------------------------------------------------------------------------------


def _kv(items: list[str] | None, what: str, parse_values: bool) -> dict:
    if not items:
        return {}
    import yaml  # only here: a command line's values, YAML-typed (`lr=0.1` is a float)

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise BadInput(f"{what} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        if not k:
            raise BadInput(f"{what} {item!r}: empty key")
        out[k] = yaml.safe_load(v) if parse_values and v else v
    return out


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Optional[list[str]] = typer.Argument(None, help="the job's argv, after --"),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="routes the job (cluster rules)"),
    cpus: float = typer.Option(1.0, "--cpus"),
    mem_gb: float = typer.Option(0.0, "--mem-gb"),
    gpus: int = typer.Option(0, "--gpus"),
    vram_gb: float = typer.Option(0.0, "--vram-gb", help="per GPU"),
    priority: int = typer.Option(0, "--priority", help="higher runs first"),
    after: Optional[list[str]] = typer.Option(None, "--after", help="job id that must complete first"),
    max_attempts: int = typer.Option(3, "--max-attempts"),
    expected_s: float = typer.Option(
        0.0, "--expected-s", help="how long it takes (default: learned from jobs like it); "
                                  "a Slurm pilot with less time left does not take it"),
    key: Optional[str] = typer.Option(None, "--key", help="idempotency key"),
    tag: Optional[list[str]] = typer.Option(None, "--tag", help="k=v"),
    trainer: Optional[str] = typer.Option(None, "--trainer", help="built-in trainer instead of a command"),
    callable_: Optional[str] = typer.Option(None, "--callable", help="module:function instead of a command"),
    param: Optional[list[str]] = typer.Option(None, "--param", help="k=v for a trainer or callable"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    name: Optional[str] = typer.Option(None, "--name"),
    isolate: bool = typer.Option(False, "--isolate", help="fresh process instead of a warm worker"),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="where the job runs (default: here, the current directory)"),
    input_: Optional[list[str]] = typer.Option(
        None, "--input", help="a file the job reads, taken with it to any node (repeatable)"),
    output: Optional[list[str]] = typer.Option(
        None, "--output", help="files it makes (a glob in its folder) that come home: `evo pull`"),
    broker: Optional[str] = BrokerOpt,
) -> None:
    """Submit a job; prints its id. It runs in the directory it was submitted from (or
    --workdir): relative paths in its command, and a callable's module, are found there. That
    folder's files (and each --input) go with the job, so any node runs what was submitted."""
    from evo.client import input_files, make_spec

    if trainer and callable_:
        raise BadInput("--trainer and --callable: give one")
    target = None
    if trainer:
        from evo.trainers.registry import resolve_trainer

        target = resolve_trainer(trainer)
    elif callable_:
        target = callable_
    if bool(command) == bool(target):
        raise BadInput("give a command after `--`, or --trainer NAME, or --callable module:function")
    params = _kv(param, "--param", True)
    data: dict[str, str] = {}
    if trainer:
        # Checked here (exit 2 before anything is queued); the data path is made absolute,
        # since the job runs elsewhere, and fingerprinted for the record.
        from evo.sweeps import data_fingerprint
        from evo.trainers.experiment import parse_params

        parse_params(trainer, params)
        params, data = data_fingerprint(params)
        model_type = model_type or trainer
    data.update(input_files(input_ or []))
    spec = make_spec(command or None, callable=target, trainer=trainer, cpus=cpus, mem_gb=mem_gb,
                     gpus=gpus, vram_gb=vram_gb, model_type=model_type, priority=priority,
                     after=list(after or []), max_attempts=max_attempts, key=key,
                     tags=_kv(tag, "--tag", False), params=params, data=data,
                     seed=seed, name=name, isolate=isolate, workdir=_workdir(workdir),
                     outputs=list(output or []), expected_s=expected_s)
    with _client(broker) as c:
        reply = c.submit_reply(spec)
    if reply.warning:
        _err(f"warning: {reply.warning}")
    if reply.duplicate:
        _err(f"key {key!r} was submitted before as {reply.job_id} with the same spec; nothing "
             f"new was queued (`evo retry {reply.job_id}` runs it again)")
    typer.echo(reply.job_id)


def _workdir(given: Path | None) -> str:
    """The folder a job runs in: as given (made absolute), else the current directory."""
    d = (given or Path.cwd()).expanduser().absolute()
    if not d.is_dir():
        raise BadInput(f"--workdir: {str(d)!r} is not a directory")
    return str(d)


@app.command()
def retry(target: str = typer.Argument(..., help="a finished job's id, or a sweep's with --failed"),
          failed: bool = typer.Option(False, "--failed",
                                      help="a sweep's failed and cancelled jobs"),
          broker: Optional[str] = BrokerOpt) -> None:
    """Run a finished job again as a new job, with the same spec, params and seed (linked to
    the old one: retry_of); prints the new id (one per line for a sweep)."""
    if target.startswith("s") and not failed:
        raise BadInput(f"{target} is a sweep: `evo retry {target} --failed` runs its failed and "
                       "cancelled jobs again")
    with _client(broker) as c:
        reply = c.retry(target)
    for new, old in zip(reply.job_ids, reply.of):
        typer.echo(new)
        _err(f"{new}: {old} again")


@app.command()
def cancel(target: str = typer.Argument(..., help="job or sweep id"),
           reason: str = typer.Option("", "--reason"),
           broker: Optional[str] = BrokerOpt) -> None:
    """Cancel a job, or every unfinished job of a sweep."""
    with _client(broker) as c:
        ids = c.cancel(target, reason)
    typer.echo(f"cancel requested for {len(ids)} job(s): {' '.join(ids)}")


# --- events -----------------------------------------------------------------------------------


def format_event(ev) -> str:  # noqa: ANN001
    import datetime as dt

    d = msgspec.structs.asdict(ev)
    t = dt.datetime.fromtimestamp(ev.time).strftime("%H:%M:%S.%f")[:-3] if ev.time else "-"
    fields = []
    for k, v in d.items():
        if k in ("seq", "time", "cause") or v in (None, "", [], {}):
            continue
        if isinstance(v, msgspec.Struct):
            v = {a: b for a, b in msgspec.structs.asdict(v).items() if b not in (None, "", [], {})}
        fields.append(f"{k}={msgspec.json.encode(v).decode() if not isinstance(v, str) else v}")
    return f"{ev.seq:>8} {t} {type(ev).__name__:<18} {' '.join(fields)}"


@app.command()
def tail(
    from_seq: int = typer.Option(1, "--from", help="first seq to show"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep following live events"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    broker: Optional[str] = BrokerOpt,
) -> None:
    """Print the events, one per line (from the broker, or from the log when none runs)."""
    from evo.home import NoBroker

    enc = msgspec.json.Encoder()

    def show(ev) -> None:  # noqa: ANN001
        line = enc.encode(ev).decode() if as_json else format_event(ev)
        sys.stdout.write(line + "\n")
        if follow:
            sys.stdout.flush()

    try:
        c = _client(broker)
    except NoBroker:
        if follow:
            raise
        from evo.events.log import SegmentLog

        with SegmentLog(evo_home() / "log", readonly=True) as lg:
            for ev in lg.read_from(from_seq):
                show(ev)
        return
    with c:
        try:
            events = c.follow(from_seq) if follow else c.read_all(from_seq)
            for ev in events:
                show(ev)
        except KeyboardInterrupt:
            pass


@app.command()
def status(broker: Optional[str] = BrokerOpt,
           as_json: bool = typer.Option(False, "--json"),
           watch: bool = typer.Option(False, "--watch", "-w", help="refresh live until Ctrl-C (on a terminal; else print once)"),
           interval: float = typer.Option(1.0, "--interval", help="seconds between refreshes"),
           as_of: int = typer.Option(0, "--as-of", help="the state at this seq (from the projection)")) -> None:
    """Queue and nodes: job counts by state, nodes, running and queued jobs."""
    from evo.cli.views import console, render_status, status_view

    if as_of:
        for title, q in (
            ("jobs by state", "SELECT state, count(*) AS jobs FROM jobs GROUP BY state ORDER BY state"),
            ("nodes", "SELECT node, state, labels, slots, cpus, mem_gb, gpus FROM nodes ORDER BY node"),
            ("running", "SELECT job_id, state, node, attempts, name FROM jobs "
                        "WHERE state IN ('leased', 'running') ORDER BY submitted_seq LIMIT 50"),
            ("queued", "SELECT job_id, priority, attempts, name FROM queue LIMIT 50"),
        ):
            _print_table(_sql(q, broker, as_of), "json" if as_json else "table",
                         title=f"{title} at seq {as_of}")
        return

    with _client(broker) as c:
        if watch and not as_json and console.is_terminal:  # piped or logged: one print
            import time

            from rich.live import Live

            with Live(status_view(c.status()), console=console, auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(interval)
                        live.update(status_view(c.status()), refresh=True)
                except KeyboardInterrupt:
                    pass
            return
        st = c.status()
    if as_json:
        typer.echo(msgspec.json.encode(st).decode())
    else:
        render_status(st)


@app.command()
def logs(job: str = typer.Argument(..., help="job id"),
         attempt: int = typer.Option(0, "--attempt", help="attempt number (default: the latest)"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         stream: str = typer.Option("both", "--stream", help="stdout, stderr or both"),
         broker: Optional[str] = BrokerOpt) -> None:
    """A job's stdout and stderr, from whichever node ran it (stderr goes to stderr)."""
    import time

    from evo.events.lifecycle import TERMINAL
    from evo.home import NoBroker

    if stream not in ("stdout", "stderr", "both"):
        raise BadInput(f"--stream: expected stdout, stderr or both, got {stream!r}")
    streams = ("stdout", "stderr") if stream == "both" else (stream,)
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    try:
        c = _client(broker)
    except NoBroker:
        if follow:
            raise
        from evo.broker.outputs import OutputStore

        store = OutputStore(evo_home() / "logs")
        tried = attempt or max(store.attempts(job) or [0])
        if not tried:
            raise EvoError(f"no output stored for {job} in {evo_home() / 'logs'}")
        for s in streams:
            data, _ = store.read(job, tried, s, 0, 1 << 40)
            sinks[s].write(data)
        return
    offsets = dict.fromkeys(streams, 0)
    with c:
        while True:
            final = False
            for s in streams:
                while True:
                    chunk = c.logs(job, attempt=attempt, stream=s, offset=offsets[s])
                    attempt = attempt or chunk.attempt  # stay on one attempt while following
                    sinks[s].write(chunk.data)
                    offsets[s] += len(chunk.data)
                    if offsets[s] >= chunk.size or not chunk.data:
                        break
                sinks[s].flush()
                final = chunk.state in TERMINAL
            if not follow or final:
                # the node ships a job's last output before its final report, so a final
                # state read after the last chunk means nothing more will come
                if follow and any(c.logs(job, attempt=attempt, stream=s, offset=offsets[s]).data
                                  for s in streams):
                    continue
                return
            time.sleep(0.3)


# --- projections ------------------------------------------------------------------------------


def _sql(sql: str, broker: str | None, as_of: int = 0, params: list | tuple = ()):  # noqa: ANN202
    """A pyarrow Table: through the broker's projection when a broker runs; else from the files,
    caught up and opened read-only. Either way read-only and bounded (projections/sql.py);
    values go in as ``params`` for the ``?`` placeholders, never quoted into the text."""
    from evo.home import NoBroker
    from evo.projections.files import from_ipc

    if as_of < 0:
        raise BadInput(f"--as-of: expected a seq >= 0, got {as_of}")
    try:
        c = _client(broker)
    except NoBroker:
        from evo.projections.files import read_projection
        from evo.projections.store import query_at

        proj = read_projection(evo_home())
        try:
            if as_of:
                return from_ipc(query_at(proj.con, as_of, sql, params=list(params))[1])
            return proj.query(sql, params)
        finally:
            proj.close()
    with c:
        reply = c.query(sql, params, as_of=as_of)
    if reply.behind:
        _err(f"warning: the answer is as of seq {reply.seq}; {reply.behind}")
    return from_ipc(reply.arrow)


def _print_table(table, fmt: str, title: str = "") -> None:  # noqa: ANN001
    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(table.column_names)
        for row in table.to_pylist():
            w.writerow(row.values())
    elif fmt == "json":
        for row in table.to_pylist():
            typer.echo(msgspec.json.encode(row).decode())
    elif fmt == "table":
        from rich.table import Table

        from evo.cli.views import console

        t = Table(title=title or None, title_justify="left")
        for name in table.column_names:
            t.add_column(name)
        for row in table.to_pylist():
            t.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                        for v in row.values()))
        console.print(t)
    else:
        raise BadInput(f"--format: expected table, csv or json, got {fmt!r}")


@app.command()
def sql(query: str = typer.Argument(..., help="one read-only SQL statement"),
        fmt: str = typer.Option("table", "--format", help="table, csv or json"),
        out: Optional[Path] = typer.Option(None, "--out", help="write the result to FILE (.csv or .parquet)"),
        as_of: int = typer.Option(0, "--as-of", help="answer from the state at this seq"),
        broker: Optional[str] = BrokerOpt) -> None:
    """SQL over the projections (events, jobs, attempts, metrics, nodes, sweeps, views)."""
    table = _sql(query, broker, as_of)
    if out is not None:
        if out.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, out)
        elif out.suffix == ".csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, out, pacsv.WriteOptions(quoting_style="needed"))
        else:
            raise BadInput(f"--out: expected a .csv or .parquet file, got {out}")
        _err(f"{table.num_rows} rows written to {out}")
        return
    _print_table(table, fmt)


@app.command()
def replay(to: Optional[int] = typer.Option(None, "--to", help="stop at this seq"),
           verify: bool = typer.Option(False, "--verify", help="compare with the live projection; exit 1 on a difference"),
           broker: Optional[str] = BrokerOpt) -> None:
    """Rebuild the projections from nothing and print their digest."""
    import time

    from evo.events.log import SegmentLog
    from evo.home import NoBroker
    from evo.projections.store import replay as rebuild

    live = None
    if verify:
        try:
            with _client(broker) as c:
                live = c.query(kind="digest")
                live_seq, live_digest, live_tables = live.seq, live.digest, live.tables
        except NoBroker:
            from evo.projections.files import read_projection

            proj = read_projection(evo_home())
            live_seq = proj.last_seq
            live_digest, live_tables = proj.digest()
            proj.close()
        to = live_seq if to is None else min(to, live_seq)
    t0 = time.perf_counter()
    with SegmentLog(evo_home() / "log", readonly=True) as lg:
        proj = rebuild((raw for _, raw in lg.read_raw_from(1)), to_seq=to)
    digest, tables = proj.digest()
    seq = proj.last_seq
    proj.close()
    typer.echo(f"replayed {seq} events in {time.perf_counter() - t0:.2f}s")
    for name, d in tables.items():
        typer.echo(f"  {name:<16} {d}")
    typer.echo(f"digest {digest}")
    if verify:
        if digest == live_digest:
            typer.echo(f"verify: the live projection at seq {live_seq} matches")
            return
        bad = [t for t in tables if tables[t] != live_tables.get(t)]
        _err(f"verify: the live projection at seq {live_seq} differs in {', '.join(bad)}")
        raise typer.Exit(1)


from evo.cli import experiments as _experiments  # noqa: E402 - registers on `app`
from evo.cli import jobs as _jobs  # noqa: E402
from evo.cli.damage import log_app as _log_app  # noqa: E402

_experiments.register(app, _sql, _print_table, _client, BrokerOpt)
_jobs.register(app, _sql, _print_table, BrokerOpt)
app.add_typer(_log_app, name="log")


_ROOT_VALUED = ("--home", "--key-file")  # the root's options that take a value


def _named(argv: list[str]) -> str | None:
    """The command the line names, after the root's own options (None: none, or help)."""
    args = iter(argv)
    for arg in args:
        if arg in _ROOT_VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
        elif arg in ("--help", "--version"):
            return None
    return None


def _for(argv: list[str]) -> typer.Typer:
    """The app with only the command the line names: typer builds every command's options
    before it parses the line (about 40 ms for all of evo's) and one needs only its own.
    Help, an unknown name or none get the whole app (its list, its suggestions)."""
    from typer.main import get_command_name

    name = _named(argv)
    cmds = [c for c in app.registered_commands
            if name == (c.name or get_command_name(c.callback.__name__))]  # type: ignore[union-attr]
    groups = [g for g in app.registered_groups if name == g.name]
    if not cmds and not groups:
        return app
    only = copy.copy(app)
    only.registered_commands, only.registered_groups = cmds, groups
    return only


def main() -> None:
    """Entry point: map evo's errors to one line on stderr and their exit codes."""
    from evo.client import BrokerUnavailable, CommandRejected

    try:
        rc = _for(sys.argv[1:])(standalone_mode=False)
    except (EvoError, BrokerUnavailable, CommandRejected) as exc:
        _err(f"evo: {exc}")
        sys.exit(getattr(exc, "exit_code", 1))
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # usage errors from the command-line parser: shown, exit 2
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, BrokenPipeError):  # `evo sql ... | head`: the reader has gone
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        if os.environ.get("EVO_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.strerror:  # the machine's, not evo's (a full disk)
            _err(f"evo: {exc.strerror}" + (f": {exc.filename}" if exc.filename else ""))
            sys.exit(1)
        # anything else is evo's bug: one line, naming the last place in evo's own code below
        # this function (else the innermost place)
        where = last = None
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None
        while tb is not None:
            last = tb
            if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("evo."):
                where = tb
            tb = tb.tb_next
        where = where or last
        at = (f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}"
              if where is not None else "")
        _err(f"evo: internal error: {type(exc).__name__}: {' '.join(str(exc).split())}{at} "
             "(EVO_DEBUG=1 shows the traceback)")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
