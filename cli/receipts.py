"""`apifast receipts verify`: check a signed receipt offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from apifast.receipts import ReceiptError, own_public_keys, public_keys, verify
from apifast.settings import Settings


def add_receipts_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    receipts = sub.add_parser("receipts", help="signed receipts").add_subparsers(
        dest="receipts_command", required=True
    )
    check = receipts.add_parser(
        "verify", help="check a receipt's signature offline and print what it says"
    )
    check.add_argument("receipt", help="the receipt (X-ApiFast-Receipt), or - to read stdin")
    check.add_argument(
        "--keys",
        type=Path,
        help="a saved /.well-known/apifast-receipts.json (default: this server's own keys, "
        "from APIFAST_RECEIPT_KEYS or the data dir)",
    )


def cmd_receipts_verify(settings: Settings, args: argparse.Namespace) -> int:
    receipt = sys.stdin.read() if args.receipt == "-" else args.receipt
    try:
        if args.keys is not None:
            keys = public_keys(orjson.loads(args.keys.read_bytes()))
        else:
            own = own_public_keys(settings.receipt_keys, settings.resolved_data_dir())
            if own is None:
                print(
                    "apifast: no receipt keys to verify with: pass --keys with a saved "
                    "/.well-known/apifast-receipts.json, or set APIFAST_RECEIPT_KEYS",
                    file=sys.stderr,
                )
                return 2
            keys = own
        fields = verify(receipt, keys)
    except (ReceiptError, OSError, orjson.JSONDecodeError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(fields, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    print("valid", file=sys.stderr)
    return 0
