"""Signed receipts: every priced request's X-ApiFast-Receipt verifies with the published
keys (offline too, with `apifast receipts verify`), says what was billed and no content, is
the same one GET /v1/generation/{id} gives, and a key holder can download them by date."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from apifast.cli.main import main as cli
from apifast.keys import hash_key
from apifast.receipts import ReceiptError, ReceiptSigner, public_keys, verify
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, free_port, models_toml, running_stack

BODY = {"model": "fast-chat", "messages": [{"role": "user", "content": "canary-receipt"}]}


def _tampered(receipt: str, **changes: object) -> str:
    payload, _, signature = receipt.partition(".")
    fields = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(
        orjson.dumps({**fields, **changes}, option=orjson.OPT_SORT_KEYS)
    )
    return forged.rstrip(b"=").decode() + "." + signature


async def test_a_receipt_verifies_says_what_was_billed_and_a_forged_one_fails(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        receipt = r.headers["x-apifast-receipt"]
        document = (await c.get("/.well-known/apifast-receipts.json")).json()
        m = await c.post("/v1/messages", json={**BODY, "max_tokens": 50})
        assert m.status_code == 200
    keys = public_keys(document)
    fields = verify(receipt, keys)
    usage = r.json()["usage"]
    assert fields["id"] == r.json()["id"] and fields["model"] == "fast-chat"
    assert fields["api"] == "chat"
    assert fields["input_tokens"] == usage["prompt_tokens"]
    assert fields["output_tokens"] == usage["completion_tokens"]
    assert Decimal(fields["cost_usd"]) == Decimal(str(usage["cost"]))
    assert fields["key"] == hash_key(SECRET.encode(), key).hex()[:16]
    assert abs(fields["ts"] / 1000 - datetime.now(UTC).timestamp()) < 600
    assert "canary-receipt" not in orjson.dumps(fields).decode()
    assert verify(m.headers["x-apifast-receipt"], keys)["api"] == "messages"
    for forged in (_tampered(receipt, cost_usd="0"), _tampered(receipt, output_tokens=1),
                   receipt[:-4] + "AAAA"):  # fmt: skip
        with pytest.raises(ReceiptError):
            verify(forged, keys)

    # The same receipt, to the byte, from the stored row once metered.
    await stack.wait_metered([r.json()["id"]])
    async with stack.client(key) as c:
        stored = (await c.get(f"/v1/generation/{r.json()['id']}")).json()
    assert stored["receipt"] == receipt

    # Offline, with the saved public keys.
    saved = tmp_path / "apifast-receipts.json"
    saved.write_bytes(orjson.dumps(document))
    assert cli(["receipts", "verify", receipt, "--keys", str(saved)]) == 0
    assert orjson.loads(capsys.readouterr().out)["id"] == r.json()["id"]
    assert cli(["receipts", "verify", _tampered(receipt, cost_usd="0"), "--keys", str(saved)]) == 1


def test_verify_without_keys_fails_and_makes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verifying only reads keys: with neither --keys, APIFAST_RECEIPT_KEYS nor a key file
    under the data dir, it says so and creates no signing key."""
    signer = ReceiptSigner.from_settings("", tmp_path / "signer")  # a server elsewhere
    receipt = signer.sign({"v": 1, "id": "gen-x"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APIFAST_RECEIPT_KEYS", raising=False)
    monkeypatch.setenv("APIFAST_DATA_DIR", str(tmp_path / "data"))
    assert cli(["receipts", "verify", receipt]) == 2
    assert "--keys" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / ".apifast").exists()
    # The server's own key file, when there is one, is read.
    monkeypatch.setenv("APIFAST_DATA_DIR", str(tmp_path / "signer"))
    assert cli(["receipts", "verify", receipt]) == 0
    assert orjson.loads(capsys.readouterr().out)["id"] == "gen-x"


def test_verify_with_a_keys_file_it_cannot_use_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: exit 1 when the receipt does not verify, 2 when there are no keys to verify
    with. A --keys file that is missing, not JSON or lists no keys is the second (it said
    `invalid:` and exited 1, as if the receipt were forged); another server's keys, the first."""
    receipt = ReceiptSigner.from_settings("", tmp_path / "signer").sign({"v": 1, "id": "gen-x"})
    monkeypatch.delenv("APIFAST_RECEIPT_KEYS", raising=False)
    monkeypatch.setenv("APIFAST_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "not.json").write_text("<html>")
    (tmp_path / "empty.json").write_text('{"keys": []}')
    for name in ("missing.json", "not.json", "empty.json"):
        assert cli(["receipts", "verify", receipt, "--keys", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "no receipt keys to verify with" in err and name in err, err
    other = ReceiptSigner.from_settings("", tmp_path / "other")
    saved = tmp_path / "other.json"
    saved.write_bytes(orjson.dumps(other.public_document()))
    assert cli(["receipts", "verify", receipt, "--keys", str(saved)]) == 1
    assert "invalid: unknown signing key" in capsys.readouterr().err


async def test_receipts_for_a_date_range_as_json_lines(stack: Stack) -> None:
    key = await stack.create_key("1.00")
    other = await stack.create_key("1.00")
    async with stack.client(key) as c, stack.client(other) as o:
        ids = [(await c.post("/v1/chat/completions", json=BODY)).json()["id"] for _ in range(3)]
        theirs = (await o.post("/v1/chat/completions", json=BODY)).json()["id"]
        await stack.wait_metered([*ids, theirs])
        keys = public_keys((await c.get("/.well-known/apifast-receipts.json")).json())
        today = datetime.now(UTC).date().isoformat()
        r = await c.get("/v1/receipts", params={"from": today, "to": today})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [orjson.loads(line) for line in r.text.splitlines()]
        assert sorted(line["id"] for line in lines) == sorted(ids)  # only the caller's
        assert all(verify(line["receipt"], keys)["id"] == line["id"] for line in lines)
        bad = await c.get("/v1/receipts", params={"from": today, "to": "2020-01-01"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "to"
        clash = await c.get("/v1/receipts", params={"start": today, "from": "2020-01-01"})
        assert clash.status_code == 400 and clash.json()["error"]["param"] == "from"
        worded = await c.get("/v1/receipts", params={"start": "soon"})
        assert worded.status_code == 400 and worded.json()["error"]["param"] == "start"
    async with stack.client() as anonymous:
        r = await anonymous.get("/v1/receipts", params={"from": today, "to": today})
        assert r.status_code == 401


async def test_receipts_take_start_and_end_and_default_to_the_usage_window(stack: Stack) -> None:
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        ids = [(await c.post("/v1/chat/completions", json=BODY)).json()["id"] for _ in range(2)]
        await stack.wait_metered(ids)
        today = datetime.now(UTC).date()
        old = (today - timedelta(days=40)).isoformat()
        usage = (await c.get("/v1/usage")).json()

        async def listed(**params: str) -> list[str]:
            r = await c.get("/v1/receipts", params=params)
            assert r.status_code == 200, r.text
            return sorted(orjson.loads(line)["id"] for line in r.text.splitlines())

        # start/end mean what from/to mean, and either pair may be left out.
        assert await listed(start=today.isoformat(), end=today.isoformat()) == sorted(ids)
        assert await listed(**{"from": today.isoformat(), "to": today.isoformat()}) == sorted(ids)
        assert await listed() == sorted(ids)  # the last 30 days, as /v1/usage
        assert await listed(end=today.isoformat()) == sorted(ids)
        assert await listed(start=old, end=old) == []
        assert usage["end"] == today.isoformat()
        assert usage["start"] == (today - timedelta(days=29)).isoformat()
        backwards = await c.get("/v1/receipts", params={"start": today.isoformat(), "end": old})
        assert backwards.status_code == 400 and backwards.json()["error"]["param"] == "end"
        # The default window ends today: an old start alone still spans at most 366 days.
        wide = await c.get("/v1/receipts", params={"start": "2020-01-01"})
        assert wide.status_code == 400 and wide.json()["error"]["param"] == "end"


async def test_receipt_and_usage_days_are_utc_dates_and_nothing_else(stack: Stack) -> None:
    """`/v1/receipts` and `/v1/usage` read a day as its first ten characters: "2026-12-07x"
    passed, a time at another offset silently became the local date, and a day near the
    ends of the calendar was a 500 (end=9999-12-31 cut the stream short, end=0001-01-05
    took its default start below year 1). Now a date, or a date-time in UTC, else a 400
    naming the parameter."""
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        await stack.wait_metered([r.json()["id"]])
        now = datetime.now(UTC)
        today = now.date().isoformat()
        for path in ("/v1/receipts", "/v1/usage"):
            for params, param in (
                ({"start": today + "garbage"}, "start"),
                ({"end": f"{today}T23:00:00-05:00"}, "end"),
                ({"start": f"{today}T01:00:00+02:00"}, "start"),
                ({"start": "9999-12-31", "end": "9999-12-31"}, "end"),
                ({"end": "0001-01-05"}, "end"),
                ({"start": "1800-01-01"}, "start"),
            ):
                got = await c.get(path, params=params)
                assert got.status_code == 400, (path, params, got.text)
                assert got.json()["error"]["param"] == param, got.text
                assert got.json()["error"]["type"] == "invalid_request_error"
            # A UTC time names its UTC day; the compact ISO date is still a date.
            for day in (f"{today}T{now:%H:%M:%S}Z", f"{today}T00:00:00+00:00", f"{now:%Y%m%d}"):
                got = await c.get(path, params={"start": day, "end": day})
                assert got.status_code == 200, (path, day, got.text)
                if path == "/v1/receipts":
                    assert [orjson.loads(x)["id"] for x in got.text.splitlines()] == [
                        r.json()["id"]
                    ]
                else:
                    assert got.json()["total_requests"] == 1
        # 366 days, both included, at most: /v1/usage let 367 through (2025-01-01..2026-01-02).
        for path, param in (("/v1/usage", "start"), ("/v1/receipts", "end")):
            wide = await c.get(path, params={"start": "2025-01-01", "end": "2026-01-02"})
            assert wide.status_code == 400 and wide.json()["error"]["param"] == param, wide.text
            full = await c.get(path, params={"start": "2025-01-01", "end": "2026-01-01"})
            assert full.status_code == 200, full.text
        # An unknown id is named in the 404, cut short: not echoed whole.
        missing = await c.get("/v1/generation/" + "x" * 5000)
        assert missing.status_code == 404 and len(missing.text) < 400, missing.text[:200]
        # The default start of a window that ends on the first day stops there.
        first = await c.get("/v1/usage", params={"end": "1970-01-05"})
        assert first.status_code == 200 and first.json()["start"] == "1970-01-01", first.text


async def test_every_protocol_and_embeddings_get_the_same_receipt_in_the_header_and_the_list(
    stack: Stack,
) -> None:
    """Chat, Messages, Responses and embeddings: each answer's X-ApiFast-Receipt is, to the
    byte, the line /v1/receipts lists for it, names its protocol (embeddings as chat), the
    generation id each protocol's own id wraps, and no content (pinned, no change needed)."""
    key = await stack.create_key("1.00")
    text = "canary-every-protocol"
    async with stack.client(key) as c:
        answers = {
            "chat": await c.post("/v1/chat/completions", json={**BODY, "messages": [
                {"role": "user", "content": text}]}),
            "messages": await c.post("/v1/messages", json={**BODY, "max_tokens": 20, "messages": [
                {"role": "user", "content": text}]}),
            "responses": await c.post("/v1/responses", json={"model": "fast-chat", "input": text}),
            "embeddings": await c.post("/v1/embeddings", json={"model": "embed-small",
                                                               "input": text}),
        }  # fmt: skip
        for name, r in answers.items():
            assert r.status_code == 200, (name, r.text)
        headers = {n: r.headers["x-apifast-receipt"] for n, r in answers.items()}
        keys = public_keys((await c.get("/.well-known/apifast-receipts.json")).json())
        fields = {n: verify(h, keys) for n, h in headers.items()}
        await stack.wait_metered([f["id"] for f in fields.values()])
        today = datetime.now(UTC).date().isoformat()
        listed = await c.get("/v1/receipts", params={"start": today, "end": today})
    lines = {orjson.loads(x)["id"]: orjson.loads(x)["receipt"] for x in listed.text.splitlines()}
    assert sorted(lines.values()) == sorted(headers.values())
    apis = {n: f["api"] for n, f in fields.items()}
    assert apis == {"chat": "chat", "messages": "messages", "responses": "responses",
                    "embeddings": "chat"}  # fmt: skip
    assert answers["messages"].json()["id"] == "msg_" + fields["messages"]["id"]
    assert answers["responses"].json()["id"] == "resp_" + fields["responses"]["id"]
    prefix = hash_key(SECRET.encode(), key).hex()[:16]
    for f in fields.values():
        assert f["key"] == prefix and text not in orjson.dumps(f).decode()
        assert set(f) == {"v", "kid", "id", "model", "api", "input_tokens", "output_tokens",
                          "cached_tokens", "cost_usd", "ts", "key"}  # fmt: skip


def _seed() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


async def test_a_receipt_verifies_offline_after_the_signing_key_is_rotated(
    stack_settings_factory: Any, fake_openai: FakeOpenAI, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The operator rotates the receipt key (a new one first in APIFAST_RECEIPT_KEYS, the
    old one kept listed): a receipt issued before verifies offline with the keys published
    after, by its kid; the stored request is signed afresh by the new key, saying the same."""
    old, new = _seed(), _seed()
    before = stack_settings_factory(models_toml(fake_openai.url), receipt_keys=f"old:{old}")
    async with running_stack(before) as stack:
        key = await stack.create_key("1.00")
        async with stack.client(key) as c:
            r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200, r.text
        issued = r.headers["x-apifast-receipt"]
        await stack.wait_metered([r.json()["id"]])
    after = before.model_copy(update={"receipt_keys": f"new:{new},old:{old}", "port": free_port()})
    async with running_stack(after) as stack, stack.client(key) as c:
        document = (await c.get("/.well-known/apifast-receipts.json")).json()
        stored = (await c.get(f"/v1/generation/{r.json()['id']}")).json()["receipt"]
    assert [k["kid"] for k in document["keys"]] == ["new", "old"]
    saved = tmp_path / "published.json"
    saved.write_bytes(orjson.dumps(document))
    assert cli(["receipts", "verify", issued, "--keys", str(saved)]) == 0
    assert orjson.loads(capsys.readouterr().out)["kid"] == "old"
    keys = public_keys(document)
    first, again = verify(issued, keys), verify(stored, keys)
    assert (first.pop("kid"), again.pop("kid")) == ("old", "new") and first == again
    # Without the old key listed, the old receipt no longer verifies: keep it published.
    alone = tmp_path / "new-only.json"
    alone.write_bytes(orjson.dumps({"keys": [document["keys"][0]]}))
    assert cli(["receipts", "verify", issued, "--keys", str(alone)]) == 1


def test_a_kid_given_twice_is_refused_at_start_up(tmp_path: Path) -> None:
    """Two keys under one kid: the first signed, the second was published under that kid,
    and no receipt verified. Now the setting is refused, naming the kid."""
    with pytest.raises(ValueError, match="'k1' is given twice"):
        ReceiptSigner.from_settings(f"k1:{_seed()},k1:{_seed()}", tmp_path)
    signer = ReceiptSigner.from_settings(f"k1:{_seed()},k2:{_seed()}", tmp_path)
    keys = public_keys(signer.public_document())
    assert verify(signer.sign({"v": 1, "id": "gen-x"}), keys)["kid"] == "k1"


def test_libsodium_signs_the_same_bytes_as_cryptography() -> None:
    """Receipts are signed with libsodium for speed; Ed25519 is deterministic, so the
    signature must be byte for byte what `cryptography` (OpenSSL) makes of the same seed."""
    seed = bytes(range(32))
    signer = ReceiptSigner.from_seeds([("k1", seed)])
    reference = Ed25519PrivateKey.from_private_bytes(seed)
    for n in (0, 1, 17, 250, 4096):
        fields = {"v": 1, "id": "gen-" + "x" * n, "cost_usd": "0.000123"}
        receipt = signer.sign(fields)
        payload = base64.urlsafe_b64decode(receipt.split(".")[0] + "==")
        signature = base64.urlsafe_b64decode(receipt.split(".")[1] + "==")
        assert signature == reference.sign(payload)
        assert verify(receipt, signer.published)["id"] == fields["id"]


def test_routers_sharing_a_data_dir_never_write_into_each_others_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compose's routers share one /data volume and, in their containers, all run as pid 1.
    Making the receipt key, one must not truncate, take over or delete the temporary file
    another is still writing: that one would then sign with a key the file does not keep."""
    import os

    from apifast import receipts

    monkeypatch.setattr(receipts.os, "getpid", lambda: 1)
    keys_dir = tmp_path / "receipts"
    keys_dir.mkdir()
    # Another router (pid 1 in its own container) is midway through writing its key.
    theirs = keys_dir / "keys.1.tmp"
    theirs.write_bytes(b"another router's key, not yet linked")
    signer = ReceiptSigner.from_settings("", tmp_path)
    assert theirs.read_bytes() == b"another router's key, not yet linked"
    stored = orjson.loads((keys_dir / "keys.json").read_bytes())
    assert [entry["kid"] for entry in stored] == list(signer.published)
    assert sorted(os.listdir(keys_dir)) == ["keys.1.tmp", "keys.json"]
