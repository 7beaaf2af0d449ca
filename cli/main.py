"""The `apifast` command: dev, serve, meter, migrate, keys, reconcile, admin and receipts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from apifast.cli.admin import add_admin_parser, cmd_admin_set_password
from apifast.cli.common import configure_logging, database_settings, require
from apifast.cli.receipts import add_receipts_parser, cmd_receipts_verify
from apifast.cli.reconcile import add_reconcile_parser, cmd_reconcile
from apifast.settings import Settings


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from apifast.catalog.toml import CatalogError
    from apifast.server.app import create_app
    from apifast.server.serve import run_uvicorn

    require(settings, "database_url", "nats_url")
    try:
        # A broken catalog is one line naming the file, the entry and the problem (README),
        # not a traceback; with several workers, before any starts, once.
        app = create_app(settings)
    except CatalogError as exc:
        print(f"apifast: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from apifast.metrics import workers_metrics

        if settings.clickhouse_url.startswith("chdb"):
            raise SystemExit("apifast: a chdb path opens in one process only; use workers = 1")
        # This process serves the metrics of every worker, which must not bind the port too.
        served = workers_metrics(settings.metrics_listen) if settings.metrics_listen else None
        with served or contextlib.nullcontext():
            # Each worker process builds its own app (and pools, and logging) from the
            # environment.
            run_uvicorn(
                "apifast.cli.worker:create_worker_app", settings, factory=True,
                workers=settings.workers,
            )  # fmt: skip
    else:
        run_uvicorn(app, settings)
    return 0


def cmd_meter(settings: Settings, args: argparse.Namespace) -> int:
    from apifast.metering.run import run_meter

    require(settings, "database_url", "nats_url", "clickhouse_url")
    asyncio.run(run_meter(settings))
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from apifast.server.migrations import migrate_database

    with database_settings(settings) as settings:
        applied = asyncio.run(migrate_database(settings.database_url))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    if settings.clickhouse_url and not settings.clickhouse_url.startswith("chdb"):
        from apifast.metering.clickhouse import ClickHouseStore

        async def ch() -> list[str]:
            store = ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
            try:
                return await store.start()
            finally:
                await store.close()

        ch_applied = asyncio.run(ch())
        print(
            "clickhouse applied: " + ", ".join(ch_applied)
            if ch_applied
            else "clickhouse is up to date"
        )
    return 0


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from apifast.cli.dev import run_dev

    return run_dev(settings)


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from apifast.key_admin import create_key
    from apifast.money import MoneyError, format_usd, parse_usd

    try:
        credit = parse_usd(args.credit, field="--credit")
    except MoneyError as exc:
        print(f"apifast: {exc}", file=sys.stderr)
        return 2
    from apifast.server.app import secret_bytes
    from apifast.server.migrations import migrate_database

    with database_settings(settings) as settings:
        asyncio.run(migrate_database(settings.database_url))
        key, balance = asyncio.run(
            create_key(
                settings.database_url,
                secret_bytes(settings),
                credit,
                rpm_limit=args.rpm_limit,
                tpm_limit=args.tpm_limit,
            )
        )
    if args.json:
        print(json.dumps({"key": key, "balance_usd": format_usd(balance)}))
    else:
        print(key)
        print(f"balance: ${format_usd(balance)}  (the key is shown only once; keep it safe)",
              file=sys.stderr)  # fmt: skip
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apifast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "dev", help="run the router and the meter on embedded engines (no services needed)"
    )
    sub.add_parser("serve", help="run the router against APIFAST_DATABASE_URL and APIFAST_NATS_URL")
    sub.add_parser("meter", help="run the metering consumer (NATS -> ClickHouse + Postgres)")
    sub.add_parser("migrate", help="apply pending database migrations")
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--credit", default="0", help="initial balance in USD, e.g. 5.00")
    create.add_argument("--rpm-limit", type=_positive, help="requests per minute for this key")
    create.add_argument("--tpm-limit", type=_positive, help="tokens per minute for this key")
    create.add_argument(
        "--json", action="store_true", help='print {"key": ..., "balance_usd": ...}'
    )
    add_reconcile_parser(sub)
    add_admin_parser(sub)
    add_receipts_parser(sub)
    return parser


COMMANDS = {
    ("dev", None): cmd_dev,
    ("serve", None): cmd_serve,
    ("meter", None): cmd_meter,
    ("migrate", None): cmd_migrate,
    ("keys", "create"): cmd_keys_create,
    ("reconcile", None): cmd_reconcile,
    ("admin", "set-password"): cmd_admin_set_password,
    ("receipts", "verify"): cmd_receipts_verify,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        # One line per bad setting, by the name the operator set, not a traceback. The
        # value is not repeated: it may be a secret.
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"APIFAST_{field.upper()}" if field else "settings"
            print(f"apifast: {name}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings)
    handler = COMMANDS[(args.command, getattr(args, f"{args.command}_command", None))]
    return handler(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
