"""The `relay` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from relay import __version__, auth
from relay.cli_sources import add_commands as add_source_commands
from relay.cli_sources import send_provider_demo
from relay.config import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings
from relay.store import Store, open_store
from relay.timefmt import format_time, utcnow
from relay.tuning import run_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = run_loop(args.run(settings, args))
    except CliError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A failure nobody foresaw still gets one line, not a traceback.
        print(
            f"relay: {args.command_name} failed: {exc.__class__.__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    return result


class CliError(Exception):
    """A command cannot go on; the message says why and what to do."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="Webhook and event-ingestion relay for AI-agent platforms."
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = _command(commands, "serve", "Run the relay server.", _serve)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")

    _command(commands, "migrate", "Apply pending store migrations and exit.", _migrate)
    _command(
        commands,
        "check-state",
        "Replay every stored event and compare with the stored state and change log.",
        _check_state,
    )

    keys = commands.add_parser("keys", help="Manage API keys.", description="Manage API keys.")
    key_commands = keys.add_subparsers(title="commands", metavar="COMMAND", required=True)
    create = _command(
        key_commands, "create", "Create an API key; the key is the last line.", _keys_create
    )
    create.add_argument(
        "--scope",
        action="append",
        choices=auth.SCOPES,
        required=True,
        help="a scope for the key (repeat for several)",
    )
    create.add_argument("--name", default="cli", help="a label for the key")
    _command(key_commands, "list", "List API keys (never their secrets).", _keys_list)
    revoke = _command(key_commands, "revoke", "Revoke an API key by id.", _keys_revoke)
    revoke.add_argument("key_id", help="the key's id (key_...)")

    subs = commands.add_parser(
        "subscriptions",
        help="Manage outbound webhook subscriptions.",
        description="Manage outbound webhook subscriptions.",
    )
    sub_commands = subs.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add = _command(
        sub_commands, "add", "Add a subscription; its secret is the last line.", _subs_add
    )
    add.add_argument("url", help="where deliveries are POSTed (http or https)")
    add.add_argument("--type", action="append", default=[], help="change type or glob")
    add.add_argument("--session", action="append", default=[], help="session id or glob")
    add.add_argument("--description", default="", help="a label for the subscription")
    add.add_argument("--ordering", choices=("none", "session"), default="none")
    add.add_argument("--max-in-flight", type=int, default=None, help="concurrent attempts")
    add.add_argument(
        "--format",
        choices=("standard", "slack", "pagerduty"),
        default="standard",
        help="the body's shape: a Standard Webhook (default), a Slack or a PagerDuty message",
    )
    add.add_argument("--routing-key", help="PagerDuty integration key (with --format pagerduty)")
    add.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a static header for every request (repeat); VALUE may be env:VAR",
    )
    _command(sub_commands, "list", "List subscriptions (never their secrets).", _subs_list)
    remove = _command(sub_commands, "remove", "Remove a subscription by id.", _subs_remove)
    remove.add_argument("subscription_id", help="the subscription's id (sub_...)")

    follow = _command(commands, "tail", "Follow the change stream (SSE) in the terminal.", _tail)
    follow.add_argument("--url", help="relay base URL (default: from server.host/port)")
    follow.add_argument(
        "--key",
        help="API key with agent:read; prefer setting $RELAY_API_KEY (read when --key is"
        " absent), since arguments show in the process list",
    )
    follow.add_argument("--type", action="append", default=[], help="change type or glob")
    follow.add_argument("--session", action="append", default=[], help="session id or glob")
    follow.add_argument("--from", dest="last_id", type=int, help="resume after this change id")
    follow.add_argument("--count", type=int, help="stop after this many changes")
    follow.add_argument("--json", action="store_true", help="print each change as JSON")

    health = _command(
        commands,
        "health",
        "Exit 0 if the relay at the configured port answers /healthz (for HEALTHCHECK).",
        _health,
    )
    health.add_argument("--url", help="relay base URL (default: from server.host/port)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (3)")

    send = _command(commands, "send", "Sign and send events to a running relay.", _send)
    what = send.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", type=Path, help="a JSON file: one event or a list")
    what.add_argument("--demo", action="store_true", help="generate a demo session lifecycle")
    send.add_argument("--sessions", type=int, default=3, help="sessions in the demo (3)")
    send.add_argument("--source", help="source id to send to (default: the first configured)")
    send.add_argument("--url", help="relay base URL (default: from server.host/port)")
    send.add_argument("--delay", type=float, default=None, help="seconds between events")
    send.add_argument("--provider", help="with --demo: a demo of this provider's payloads")
    add_source_commands(commands, _command)
    return parser


def _command(
    commands: Any, name: str, help_text: str, run: Callable[..., Any]
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML config file (default: $RELAY_CONFIG, else {DEFAULT_CONFIG_PATH} if present)",
    )
    sub.set_defaults(run=run, command_name=sub.prog.removeprefix("relay "))
    return sub


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | str | None = args.config or os.environ.get("RELAY_CONFIG")
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    settings = load_settings(path)
    host, port = getattr(args, "host", None), getattr(args, "port", None)
    if host is None and port is None:
        return settings
    server = settings.server.model_copy(
        update={
            "host": host or settings.server.host,
            "port": settings.server.port if port is None else port,
        }
    )
    return settings.model_copy(update={"server": server})


# -- serve -----------------------------------------------------------------------------------


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from relay.logs import configure_logging
    from relay.source_secrets import SourceSecretsError, provision, secrets_path
    from relay.store import is_embedded
    from relay.store.lock import StoreInUse, serving_lock
    from relay.store.sqlite import sqlite_path

    configure_logging(settings.log)
    _raise_open_file_limit()
    try:
        settings, generated = provision(settings)
    except (OSError, SourceSecretsError) as exc:
        print(f"relay: cannot set up the sources' secrets: {exc}", file=sys.stderr)
        return 1
    if generated:
        _show_generated_secrets(generated, secrets_path(settings))

    def show_key(new_key: auth.NewKey) -> None:
        print(
            "\nFirst start: created an admin API key (scopes agent:read agent:write).\n"
            "It is shown only this once; keep it:\n\n"
            f"    {new_key.secret}\n",
            flush=True,
        )

    # One relay per SQLite file; relays on a database server share it (cluster mode).
    url = settings.store.url
    lock = serving_lock(sqlite_path(url)) if is_embedded(url) else contextlib.nullcontext()
    try:
        with lock:
            return await _serve_locked(settings, show_key)
    except StoreInUse as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


async def _serve_locked(settings: Settings, show_key: Callable[[auth.NewKey], None]) -> int:
    from relay.app import create_app
    from relay.logs import flush_logs
    from relay.server import app_runner
    from relay.tuning import tune_gc

    app = create_app(settings, on_bootstrap_key=show_key)
    runner = app_runner(app, settings.server)
    flusher: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            where = f"{settings.server.host}:{settings.server.port}"
            print(f"relay: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        tune_gc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        base = _base_url(runner.addresses[0]) if runner.addresses else site.name
        print(
            f"relay {__version__} listening on {base}\n"
            f"  store: {settings.store.url}\n"
            f"  try:   relay send --demo --url {base}   (from a checkout: .venv/bin/relay ...)\n"
            f"  stop:  Ctrl-C",
            flush=True,
        )
        if not settings.sources:
            print(
                "relay: no [[sources]] configured, so every ingest gets 404 UNKNOWN_SOURCE"
                " (was a --config file meant? see config/relay.toml)",
                file=sys.stderr,
                flush=True,
            )
        flusher = asyncio.create_task(_flush_logs_periodically())
        await stop.wait()
        print("relay: shutting down", flush=True)
    finally:
        # Also when start-up fails: the store's threads must end for the process to exit.
        await runner.cleanup()
        if flusher is not None:
            flusher.cancel()
        flush_logs()
    return 0


def _show_generated_secrets(generated: dict[str, str], path: Path) -> None:
    lines = "\n".join(f"    {source_id}: {secret}" for source_id, secret in generated.items())
    print(
        "\nFirst start: generated a signing secret for each source configured without one\n"
        f"(kept in {path}, where `relay send` finds it). A platform that sends to this\n"
        "relay signs with it; it is shown only this once. To use a platform's own secret\n"
        'instead, configure the source with secrets = ["env:VAR"].\n\n'
        f"{lines}\n",
        flush=True,
    )


async def _flush_logs_periodically(interval: float = 0.25) -> None:
    from relay.logs import flush_logs

    while True:
        await asyncio.sleep(interval)
        flush_logs()


def _raise_open_file_limit() -> None:
    """Each SSE subscriber holds a socket: allow as many as the hard limit permits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _base_url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- store commands ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _opened(settings: Settings) -> Any:
    """The configured store, opened with the configured sources' normalisers; one that
    does not exist is not created (that is `relay migrate`'s job)."""
    from relay.app import source_providers
    from relay.store import is_embedded
    from relay.store.sqlite import sqlite_path

    path = sqlite_path(settings.store.url)
    if is_embedded(settings.store.url) and not path.exists():
        raise SystemExit(
            f"relay: no store at {path.resolve()} (check store.url, or create it with"
            " `relay migrate`)"
        )
    store: Store = open_store(settings.store, source_providers(settings), settings.alerts)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.store)
    applied = await store.migrate()
    await store.close()
    print(f"applied migrations: {applied}" if applied else "the store is up to date")
    return 0


async def _check_state(settings: Settings, args: argparse.Namespace) -> int:
    async with _opened(settings) as store:
        problems = await store.check_derived_state()
    for problem in problems:
        print(problem)
    print("derived state and change log match the events" if not problems else "MISMATCH")
    return 1 if problems else 0


async def _keys_create(settings: Settings, args: argparse.Namespace) -> int:
    async with _opened(settings) as store:
        new_key = await auth.create_key(store, args.name, tuple(args.scope))
    print(f"created {new_key.key.id} ({' '.join(new_key.key.scopes)}); the key:")
    print(new_key.secret)
    return 0


async def _keys_list(settings: Settings, args: argparse.Namespace) -> int:
    async with _opened(settings) as store:
        keys = await store.list_api_keys()
    for key in keys:
        state = f"revoked {key.revoked_at}" if key.revoked_at else "active"
        print(f"{key.id}  {' '.join(key.scopes):<24} {state:<34} {key.name}")
    if not keys:
        print("no API keys")
    return 0


async def _keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async with _opened(settings) as store:
        revoked = await store.revoke_api_key(args.key_id, format_time(utcnow()))
    if not revoked:
        print(f"relay: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


@contextlib.asynccontextmanager
async def _delivery_store(settings: Settings) -> Any:
    """The configured delivery store (after the main store applied migrations)."""
    from relay.webhooks.store import open_delivery_store

    async with _opened(settings):
        store = open_delivery_store(settings.store)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


async def _subs_add(settings: Settings, args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError

    from relay.errors import field_problem
    from relay.store import data_directory
    from relay.webhooks.secrets import SecretBox
    from relay.webhooks.subscriptions import NewSubscription, create_subscription

    headers = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            print(f"relay: --header {header!r} is not 'NAME: VALUE'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    try:
        fields = NewSubscription(
            url=args.url,
            types=args.type or None,
            session_ids=args.session or None,
            description=args.description,
            ordering=args.ordering,
            max_in_flight=args.max_in_flight,
            format=args.format,
            routing_key=args.routing_key,
            headers=headers or None,
        )
    except ValidationError as exc:
        print(f"relay: {field_problem(exc.errors()[0], '')}", file=sys.stderr)
        return 2
    box = SecretBox.from_config(
        settings.delivery.encryption_key, data_directory(settings.store.url)
    )
    async with _delivery_store(settings) as store:
        subscription, secret = await create_subscription(store, box, fields, time.time())
    print(f"created {subscription.id} -> {subscription.url}; its signing secret:")
    print(secret)
    return 0


async def _subs_list(settings: Settings, args: argparse.Namespace) -> int:
    async with _delivery_store(settings) as store:
        subscriptions = await store.list_subscriptions()
    for s in subscriptions:
        state = "enabled" if s.enabled else f"disabled ({s.disabled_reason})"
        types = ",".join(s.types) or "(all but raw.*)"
        print(
            f"{s.id}  {s.url}  format={s.format.value}  types={types}"
            f"  ordering={s.ordering.value}  {state}"
        )
    if not subscriptions:
        print("no subscriptions")
    return 0


async def _subs_remove(settings: Settings, args: argparse.Namespace) -> int:
    async with _delivery_store(settings) as store:
        removed = await store.delete_subscription(args.subscription_id)
    if not removed:
        print(f"relay: no subscription {args.subscription_id}", file=sys.stderr)
        return 1
    print(f"removed {args.subscription_id}")
    return 0


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from relay.tail import tail

    url = args.url or _base_url((settings.server.host, settings.server.port))
    key = args.key or os.environ.get("RELAY_API_KEY")
    return await tail(url, key, args.type, args.session, args.last_id, args.count, raw=args.json)


# -- health ----------------------------------------------------------------------------------


def _local_url(settings: Settings) -> str:
    """The relay's own address as seen from this host (a wildcard listens on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        settings.server.host, settings.server.host
    )
    return _base_url((host, settings.server.port))


async def _health(settings: Settings, args: argparse.Namespace) -> int:
    url = f"{(args.url or _local_url(settings)).rstrip('/')}/healthz"
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(url) as resp,
        ):
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"relay: {url} does not answer ({exc.__class__.__name__})", file=sys.stderr)
        return 1
    if status != 200:
        print(f"relay: {url} answered {status}", file=sys.stderr)
        return 1
    print(f"{url}: ok")
    return 0


# -- send ------------------------------------------------------------------------------------


def _load_events(path: Path) -> list[dict[str, Any]]:
    """The events in a JSON file: one object, or a list of objects."""
    try:
        loaded = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise CliError(f"no file {path}: give the path of a JSON file of events") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON ({exc}): fix the file") from None
    events = loaded if isinstance(loaded, list) else [loaded]
    if not all(isinstance(event, dict) for event in events):
        raise CliError(f"{path} must hold a JSON object or a list of objects (one per event)")
    return events


def _unreachable(url: str, exc: BaseException) -> str:
    return (
        f"cannot reach a relay at {url} ({exc.__class__.__name__}): start it with"
        " `relay serve`, or give its address with --url"
    )


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    from relay.send import demo_lifecycle, send_events
    from relay.source_secrets import SourceSecretsError, needs_secret, stored_settings

    try:
        settings = stored_settings(settings)
    except SourceSecretsError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    url = args.url or _base_url((settings.server.host, settings.server.port))
    if args.demo and args.provider not in (None, "casedev", "generic"):
        delay = 0.25 if args.delay is None else args.delay
        try:
            return await send_provider_demo(settings, args, url, delay)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise CliError(_unreachable(url, exc)) from None
    sources = {s.id: s for s in settings.sources}
    if args.provider:
        sources = {k: s for k, s in sources.items() if s.provider == args.provider}
    source_id = args.source or next(iter(sources), None)
    if source_id is None:
        print(
            "relay: the configuration has no [[sources]] to sign for"
            " (give --config, or run where config/relay.toml is)",
            file=sys.stderr,
        )
        return 2
    if source_id not in sources:
        print(f"relay: no source {source_id!r} in the configuration", file=sys.stderr)
        return 2
    source = sources[source_id]
    if needs_secret(source):
        print(
            f"relay: source {source_id!r} has no secret yet: start the relay once"
            " (relay serve, with this config) to generate one, or configure its secrets",
            file=sys.stderr,
        )
        return 1
    if args.demo:
        events = demo_lifecycle(args.sessions)
        delay = 0.25 if args.delay is None else args.delay
    else:
        events = _load_events(args.file)
        delay = args.delay or 0.0
    try:
        answers = await send_events(url, sources[source_id], events, delay)
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise CliError(_unreachable(url, exc)) from None
    failed = 0
    for event, (status, answer) in zip(events, answers, strict=True):
        failed += status >= 300
        print(f"{status}  {event.get('type', '?'):<28} {orjson.dumps(answer).decode()}")
    return 1 if failed else 0
