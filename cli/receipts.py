"""`apifast receipts verify`: check a signed receipt offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
    keys = _keys_to_verify_with(settings, args.keys)
    if keys is None:
        return 2
    receipt = sys.stdin.read() if args.receipt == "-" else args.receipt
    try:
        fields = verify(receipt, keys)
    except ReceiptError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(fields, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    print("valid", file=sys.stderr)
    return 0


def _keys_to_verify_with(
    settings: Settings, path: Path | None
) -> dict[str, Ed25519PublicKey] | None:
    """The public keys, or None (said on stderr) when there are none to verify with: exit 2,
    apart from exit 1 (the receipt does not verify), so a script can tell a forged receipt
    from a check that could not be made."""
    if path is None:
        own = own_public_keys(settings.receipt_keys, settings.resolved_data_dir())
        if own is None:
            print(
                "apifast: no receipt keys to verify with: pass --keys with a saved "
                "/.well-known/apifast-receipts.json, or set APIFAST_RECEIPT_KEYS",
                file=sys.stderr,
            )
        return own
    try:
        keys = public_keys(orjson.loads(path.read_bytes()))
    except OSError as exc:
        problem = exc.strerror or type(exc).__name__
    except orjson.JSONDecodeError:
        problem = "not JSON"
    except ReceiptError as exc:
        problem = str(exc)
    else:
        if keys:
            return keys
        problem = "it lists no keys"
    print(f"apifast: no receipt keys to verify with in {path}: {problem}", file=sys.stderr)
    return None
