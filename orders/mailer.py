"""Outgoing mail over SMTP, sent in the background with retries.

`send` only queues, so an order or a recovery request never waits for a mail server. A
failed delivery is retried with exponential back-off; the queue lives in memory, so mail
still pending when the process stops is lost (the buyer can ask again with /v1/recover).
Mails carry API keys: neither addresses nor bodies are ever logged.

`APIFAST_SMTP_URL` is `smtp://[user:password@]host[:port]` (STARTTLS when the server offers
it; add `?starttls=require` to insist, `?starttls=never` to skip) or `smtps://...` (TLS from
the first byte).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("apifast.mailer")

__all__ = ["Mail", "Mailer", "SmtpConfig"]


@dataclass(frozen=True, slots=True)
class Mail:
    to: str
    subject: str
    body: str


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    implicit_tls: bool = False
    starttls: str = "auto"  # auto | require | never
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SmtpConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("APIFAST_SMTP_URL must look like smtp://user:pass@host:port")
        starttls = parse_qs(parts.query).get("starttls", ["auto"])[0]
        if starttls not in ("auto", "require", "never"):
            raise ValueError("APIFAST_SMTP_URL: starttls must be auto, require or never")
        implicit = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if implicit else 25),
            implicit_tls=implicit,
            starttls=starttls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def _message(sender: str, mail: Mail) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = formatdate(localtime=False)
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = make_msgid(domain=domain)
    message.set_content(mail.body)
    return message


def deliver(config: SmtpConfig, sender: str, mail: Mail, timeout_s: float) -> None:
    """One blocking SMTP delivery (run in a thread)."""
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if config.implicit_tls:
        smtp = smtplib.SMTP_SSL(config.host, config.port, timeout=timeout_s, context=context)
    else:
        smtp = smtplib.SMTP(config.host, config.port, timeout=timeout_s)
    with smtp:
        smtp.ehlo()
        if not config.implicit_tls and config.starttls != "never":
            if smtp.has_extn("starttls"):
                smtp.starttls(context=context)
                smtp.ehlo()
            elif config.starttls == "require":
                raise smtplib.SMTPNotSupportedError("the server does not offer STARTTLS")
        if config.username:
            smtp.login(config.username, config.password or "")
        smtp.send_message(_message(sender, mail))


class Mailer:
    def __init__(
        self,
        smtp_url: str,
        sender: str,
        *,
        timeout_s: float = 30.0,
        attempts: int = 6,
        retry_base_s: float = 30.0,
    ) -> None:
        self.config = SmtpConfig.parse(smtp_url) if smtp_url else None
        self.sender = sender
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._retry_base_s = retry_base_s
        self._queue: asyncio.Queue[tuple[Mail, int]] = asyncio.Queue()
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0

    @property
    def configured(self) -> bool:
        return self.config is not None

    async def start(self) -> None:
        if self._worker is None and self.config is not None:
            self._worker = asyncio.create_task(self._run(), name="apifast-mailer")

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._worker] if self._worker else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pending:
            log.warning("mailer stopped with %d mail(s) undelivered", self._pending)
        self._worker = None

    def send(self, mail: Mail) -> None:
        """Queue a mail; returns at once. Without SMTP configured, the mail is dropped."""
        if self.config is None:
            log.warning("a mail was not sent: APIFAST_SMTP_URL is not set")
            return
        self._pending += 1
        self._idle.clear()
        self._queue.put_nowait((mail, 1))

    async def idle(self) -> None:
        """Wait until every queued mail is delivered or given up."""
        await self._idle.wait()

    def _done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    async def _run(self) -> None:
        assert self.config is not None
        while True:
            mail, attempt = await self._queue.get()
            try:
                await asyncio.to_thread(deliver, self.config, self.sender, mail, self._timeout_s)
            except Exception as exc:  # any failure is retried
                if attempt >= self._attempts:
                    log.error("mail given up after %d attempts: %s", attempt, type(exc).__name__)
                    self.failed += 1
                    self._done()
                else:
                    delay = self._retry_base_s * 2 ** (attempt - 1)
                    log.warning(
                        "mail attempt %d failed (%s); retrying in %.0fs",
                        attempt,
                        type(exc).__name__,
                        delay,
                    )
                    self._later(delay, mail, attempt + 1)
            else:
                self.delivered += 1
                self._done()

    def _later(self, delay: float, mail: Mail, attempt: int) -> None:
        async def requeue() -> None:
            await asyncio.sleep(delay)
            self._queue.put_nowait((mail, attempt))

        task = asyncio.create_task(requeue())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
