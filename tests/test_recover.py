"""Optional email: the encrypted key copy, mailing keys over SMTP (a real in-process server),
recovery by address, removal, retries and rate limits."""

from __future__ import annotations

import base64
import os

import pytest

from apifast.crypto import KeyRing, KeyRingError
from apifast.ip_limits import IpRateLimiter
from apifast.orders.email_keys import email_hash, key_aad, normalize_email
from apifast.orders.mailer import Mail, Mailer, SmtpConfig
from apifast.orders.recover_api import ACCEPTED
from tests.fakes.mailbox import Mailbox
from tests.payments_harness import PayEnv, payments_env_fixture

env = payments_env_fixture("recover")


# --- units ------------------------------------------------------------------------------------


def _b64(n: int = 32) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def test_key_ring_rotation() -> None:
    old = KeyRing.parse(f"k0:{(k0 := _b64())}")
    sealed = old.encrypt(b"af-secret", b"aad")
    assert sealed.kid == "k0" and b"af-secret" not in sealed.ciphertext
    rotated = KeyRing.parse(f"k1:{_b64()}, k0:{k0}")
    assert rotated.current == "k1"
    assert rotated.decrypt(sealed, b"aad") == b"af-secret"  # old rows still open
    assert rotated.encrypt(b"x", b"aad").kid == "k1"  # new rows use the new key
    with pytest.raises(KeyRingError):
        rotated.decrypt(sealed, b"other row")  # bound to its row
    with pytest.raises(KeyRingError):
        KeyRing.parse(f"k1:{_b64()}").decrypt(sealed, b"aad")  # k0 retired


@pytest.mark.parametrize(
    "spec", ["k0", "k0:notbase64!", f"k0:{_b64(20)}", f"k0:{_b64()},k0:{_b64()}", ":" + _b64()]
)
def test_key_ring_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(KeyRingError):
        KeyRing.parse(spec)


def test_derived_key_ring_is_stable() -> None:
    a = KeyRing.from_settings("", b"s" * 40)
    sealed = a.encrypt(b"k", b"")
    assert KeyRing.from_settings("", b"s" * 40).decrypt(sealed, b"") == b"k"
    with pytest.raises(KeyRingError):
        KeyRing.from_settings("", b"t" * 40).decrypt(sealed, b"")


def test_email_normalization() -> None:
    assert normalize_email("  Buyer@Example.COM ") == "buyer@example.com"
    for bad in ("", "no-at", "a@b", "a b@c.de", "a@@c.de", None, 5, "x" * 250 + "@c.de"):
        assert normalize_email(bad) is None
    assert email_hash(b"s", "a@b.cd") != email_hash(b"t", "a@b.cd")


def test_smtp_url_parsing() -> None:
    plain = SmtpConfig.parse("smtp://user%40x:p%3Ass@mail.example:2525?starttls=require")
    assert (plain.host, plain.port, plain.username, plain.password, plain.starttls) == (
        "mail.example",
        2525,
        "user@x",
        "p:ss",
        "require",
    )
    assert SmtpConfig.parse("smtps://mail.example").port == 465
    for bad in ("http://x", "smtp://", "smtp://h?starttls=maybe"):
        with pytest.raises(ValueError):
            SmtpConfig.parse(bad)


async def test_mailer_retries_without_blocking() -> None:
    box = Mailbox().start()
    try:
        box.fail_next = 2
        mailer = Mailer(box.url, "ApiFast <k@apifast.test>", attempts=3, retry_base_s=0)
        await mailer.start()
        mailer.send(Mail("a@b.cd", "subject", "body text"))  # returns at once
        await mailer.idle()
        assert (box.rejected, mailer.delivered, mailer.failed) == (2, 1, 0)
        assert box.to("a@b.cd")[0].body.strip() == "body text"
        box.fail_next = 5
        mailer.send(Mail("c@d.ef", "s", "b"))
        await mailer.idle()
        assert (mailer.failed, box.to("c@d.ef")) == (1, [])
        await mailer.close()
    finally:
        box.stop()


# --- through the API -----------------------------------------------------------------------


async def test_email_given_at_order_mails_the_key(env: PayEnv) -> None:
    order = await env.new_order("10.00", email="Buyer.One@Example.com")
    assert order["email_saved"] is True
    await env.runtime.drain()
    mails = env.mailbox.to("buyer.one@example.com")
    assert len(mails) == 1
    assert order["api_key"] in mails[0].body and order["order_id"] in mails[0].body
    assert mails[0].message["From"] == "ApiFast <keys@apifast.test>"
    # Neither the address nor the key is stored in the clear.
    row = await env.pool.fetchrow(
        "SELECT e.* FROM email_keys e JOIN orders o ON o.key_id = e.key_id WHERE o.id = $1",
        order["order_id"],
    )
    dump = repr(dict(row)).lower()
    assert "buyer.one" not in dump and order["api_key"].lower() not in dump
    assert bytes(row["key_ciphertext"]).find(order["api_key"].encode()) == -1


async def test_recover_mails_every_key_of_the_address(env: PayEnv) -> None:
    address = "many.keys@example.org"
    first = await env.new_order("10.00", email=address)
    second = await env.new_order("5.00", email=address.upper(), processor="btcpay")
    await env.new_order("5.00", email="someone.else@example.org")
    await env.runtime.drain()
    before = len(env.mailbox.to(address))
    async with env.client() as client:
        response = await client.post("/v1/recover", json={"email": f" {address} "})
    assert (response.status_code, response.json()) == (202, ACCEPTED)
    await env.runtime.drain()
    mails = env.mailbox.to(address)
    assert len(mails) == before + 1
    assert first["api_key"] in mails[-1].body and second["api_key"] in mails[-1].body
    assert "someone.else" not in mails[-1].body


async def test_recover_answers_the_same_for_unknown_addresses(env: PayEnv) -> None:
    async with env.client() as client:
        response = await client.post("/v1/recover", json={"email": "nobody@example.net"})
    assert (response.status_code, response.json()) == (202, ACCEPTED)
    await env.runtime.drain()
    assert env.mailbox.to("nobody@example.net") == []


async def test_recover_rejects_a_malformed_address(env: PayEnv) -> None:
    async with env.client() as client:
        for body in ({"email": "not-an-address"}, {}, {"email": 5}):
            response = await client.post("/v1/recover", json=body)
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "email"


async def test_top_up_can_attach_an_email_to_an_existing_key(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    key = order["api_key"]
    response = await env.order(key, amount_usd="3", processor="btcpay", email="later@example.com")
    assert response.status_code == 201 and "api_key" not in response.json()
    await env.runtime.drain()
    assert key in env.mailbox.to("later@example.com")[-1].body


async def test_key_holder_can_remove_their_email(env: PayEnv) -> None:
    address = "forget.me@example.com"
    order = await env.new_order("10.00", email=address)
    key = order["api_key"]
    async with env.client(key) as client:
        response = await client.delete("/v1/key/email")
        assert response.status_code == 200 and response.json()["deleted"] is True
        assert (await client.delete("/v1/key/email")).json()["deleted"] is False
    async with env.client() as client:
        assert (await client.delete("/v1/key/email")).status_code == 401
        await client.post("/v1/recover", json={"email": address})
    await env.runtime.drain()
    assert all(key not in m.body for m in env.mailbox.to(address)[1:])
    assert len(env.mailbox.to(address)) == 1  # only the mail sent with the order


async def test_recovery_is_rate_limited_per_ip(env: PayEnv) -> None:
    saved = env.runtime.recover_limiter
    env.runtime.recover_limiter = IpRateLimiter(2, 3600, name="recovery")
    try:
        async with env.client() as client:
            codes = [
                (await client.post("/v1/recover", json={"email": "r@example.com"})).status_code
                for _ in range(3)
            ]
        assert codes == [202, 202, 429]
    finally:
        env.runtime.recover_limiter = saved


async def test_stored_copy_opens_with_the_rotated_ring(env: PayEnv) -> None:
    order = await env.new_order("10.00", email="rotate@example.com")
    row = await env.pool.fetchrow(
        "SELECT e.* FROM email_keys e JOIN orders o ON o.key_id = e.key_id WHERE o.id = $1",
        order["order_id"],
    )
    from apifast.crypto import EncryptedKey

    sealed = EncryptedKey(row["enc_key_id"], bytes(row["nonce"]), bytes(row["key_ciphertext"]))
    hashed = email_hash(env.stack.state.secret, "rotate@example.com")
    assert bytes(row["email_hash"]) == hashed
    plain = env.runtime.keyring.decrypt(sealed, key_aad(row["key_id"], hashed))
    assert plain.decode() == order["api_key"]
