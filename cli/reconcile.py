"""`apifast reconcile`: the command around `apifast.metering.reconcile`.

    apifast reconcile [--from DAY|TIME] [--to DAY|TIME] [--repair] [--json]

Compares the ledger with ClickHouse's usage rows id by id, and the dashboards' rollups with
those rows group by group (docs/billing.md). Runs on the configured Postgres and ClickHouse,
or, when neither is set, on the embedded engines of `apifast dev` (which must not be
running). Exit status: 0 when the stores agree
(after repair, if asked), 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

from apifast.metering.reconcile import Report, reconcile
from apifast.settings import Settings


def _moment(text: str, *, end: bool) -> datetime:
    """A date (a whole UTC day; for --to the day is included) or an ISO date-time."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day, datetime.min.time(), UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or ISO date-time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_reconcile_parser(sub: Any) -> None:
    """Add `apifast reconcile` to the CLI's subcommands."""
    p = sub.add_parser(
        "reconcile",
        help="compare the Postgres ledger with ClickHouse per key, and the rollups with the raw "
        "events, over a range (--repair fixes)",
    )
    p.add_argument(
        "--from", dest="start", help="start: YYYY-MM-DD or ISO time (default: --to - 1 day)"
    )
    p.add_argument("--to", dest="end", help="end: YYYY-MM-DD (included) or ISO time (default: now)")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed; flag the rest")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    try:
        end = _moment(args.end, end=True) if args.end else datetime.now(UTC)
        start = _moment(args.start, end=False) if args.start else end - timedelta(days=1)
    except argparse.ArgumentTypeError as exc:
        print(f"apifast reconcile: {exc}", file=sys.stderr)
        return 2
    if start >= end:
        print("apifast reconcile: --from must be before --to", file=sys.stderr)
        return 2
    if settings.database_url and settings.clickhouse_url:
        report = asyncio.run(reconcile(settings, start, end, repair=args.repair))
    elif settings.database_url or settings.clickhouse_url:
        print(
            "apifast reconcile: set both APIFAST_DATABASE_URL and APIFAST_CLICKHOUSE_URL, "
            "or neither (the embedded engines under APIFAST_DATA_DIR)",
            file=sys.stderr,
        )
        return 2
    else:
        report_or_error = _reconcile_embedded(settings, start, end, args.repair)
        if isinstance(report_or_error, str):
            print(f"apifast reconcile: {report_or_error}", file=sys.stderr)
            return 2
        report = report_or_error
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.clean else 1


def _reconcile_embedded(
    settings: Settings, start: datetime, end: datetime, repair: bool
) -> Report | str:
    """On the data dir of `apifast dev`, which must not be running: its chdb data opens in
    one process only."""
    from apifast.embedded import embedded_stack, read_dev_state

    running = read_dev_state(settings.resolved_data_dir())
    if running is not None:
        return (
            f"apifast dev is running (pid {running.pid}) and holds the ClickHouse data; "
            "stop it first, then run reconcile"
        )
    with embedded_stack(settings, write_state=False) as resolved:
        return asyncio.run(reconcile(resolved, start, end, repair=repair))


__all__ = ["add_reconcile_parser", "cmd_reconcile"]
