"""All configuration, read from `APIFAST_*` environment variables and `.env`."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The shortest order and ledger retention: longer than the stream keeps an event (7 days) and
# than any spool replay, so a redelivered event still meets its ledger row.
ORDER_RETENTION_MIN_DAYS = 30
# APIFAST_LOG_LEVEL's names, any case: the ones both logging and uvicorn know (uvicorn has no
# NOTSET, logging no TRACE), and logging's aliases for two of them.
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APIFAST_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Where things are.
    database_url: str = ""
    nats_url: str = ""
    clickhouse_url: str = ""
    clickhouse_database: str = "apifast"
    models_file: Path | None = None
    data_dir: Path = Path(".apifast")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""
    # Proxies whose X-Forwarded-For gives the client address (for per-IP limits only).
    # Proxies whose X-Forwarded-For is believed (comma-separated IPs, or "*"). Empty: none,
    # so nothing on the router's host can pick its own client address. Behind a proxy, set
    # it to the proxy's address, and let only the proxy reach the routers.
    forwarded_allow_ips: str = ""
    # A client has this long to send its whole request body (408 after).
    body_read_timeout_s: float = Field(default=30.0, gt=0)

    # Secrets. HMAC key for API-key hashes; in `apifast dev` one is generated under data_dir.
    secret_key: str = ""
    # Ed25519 keys that sign receipts, "kid:base64url(32-byte seed),..." (the first signs, all
    # are published). Empty: one generated once under data_dir (a single host only).
    receipt_keys: str = ""

    # Request limits.
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024

    # Metering.
    nats_stream: str = "APIFAST_USAGE"
    nats_subject: str = "apifast.usage"
    meter_durable: str = "apifast-meter"
    meter_batch_size: int = 500
    meter_batch_wait_s: float = 0.5
    spool_max_events: int = 100_000
    # Copies JetStream keeps of the usage stream: 3 on a 3-node cluster (docs/scaling.md).
    # An existing stream with fewer is raised at start; APIFAST_NATS_URL then lists the nodes.
    nats_replicas: int = Field(default=1, ge=1, le=5)
    # Raw usage events, and the per-key daily rollup, are kept this many days in ClickHouse
    # (a TTL); 0 keeps them. Past it only the model-level rollups remain, with no key hash.
    usage_retention_days: int = Field(default=0, ge=0)
    # Closed orders (with their payments and history) and ledger rows are kept this many days;
    # 0 keeps them. Older ledger rows are summed into one carried-forward row per key, so
    # balances and each key's ledger total stay exact (docs/billing.md, Retention). At least
    # 30: the ledger's unique generation ids must outlive every redelivery (the stream keeps
    # 7 days) and orders must outlive their reconciliation (APIFAST_RECONCILE_MAX_AGE_S).
    order_retention_days: int = Field(default=0, ge=0)

    # Reservations: an unsettled hold is released after this many seconds.
    reservation_ttl_s: int = 900
    # How often the meter looks for expired holds (and bills abandoned streams' checkpoints).
    reservation_sweep_s: float = Field(default=30.0, gt=0)
    # A stream checkpoints its delivered usage through the event path this often, so that a
    # stream whose router dies is billed at least its last checkpoint; 0 turns it off.
    stream_checkpoint_s: float = Field(default=5.0, ge=0)
    # A request whose hold is refused only because the key's requests in flight hold the
    # balance waits this long for them to settle, then gets 429 with Retry-After (402 only
    # when the settled balance cannot pay).
    hold_wait_s: float = Field(default=3.0, ge=0)
    # POST /v1/key/rotate waits this long for the old key's requests in flight to settle
    # (then 409 requests_in_flight, nothing moved).
    rotate_wait_s: float = Field(default=10.0, ge=0)
    # Balance leases (docs/billing.md): a router holds up to this share of a key's available
    # balance at a time and serves its requests' holds from it in memory. 0 turns them off:
    # every request then takes its own hold in Postgres.
    lease_share: Decimal = Field(default=Decimal("0.25"), ge=0, le=1)
    # A key gets a lease on a router once that router holds this many of its requests in
    # Postgres within a second: below that, a lease saves little.
    lease_min_rps: int = Field(default=200, ge=1)
    # A lease its router stops renewing (the router died) is released after this long.
    lease_ttl_s: int = Field(default=60, ge=3)
    # A lease unused this long is given back.
    lease_idle_s: float = Field(default=5.0, gt=0)
    # A Messages API stream sends a `ping` event after this long without upstream data, so
    # that clients and proxies do not time out an idle connection; 0 turns it off.
    stream_ping_s: float = Field(default=10.0, ge=0)
    default_max_output_tokens: int = 4096
    # Smart routing (router/route_health.py, route_choice.py, health_share.py). A route's
    # breaker opens after this many consecutive failures, or when at least this share of its
    # last `breaker_window` outcomes failed; it stays open `breaker_cooldown_s`, then lets one
    # probe through.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_error_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_window: int = Field(default=20, ge=2)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    # A request tries at most this many routes (across its `models` too), and starts no new
    # attempt after this many seconds; only ever before the client got a byte.
    route_max_attempts: int = Field(default=3, ge=1)
    route_deadline_s: float = Field(default=60.0, gt=0)
    # Core NATS subject on which routers share breaker changes; empty: NATS_SUBJECT.route_health.
    route_health_subject: str = ""
    # Per-key limits for keys whose own rpm_limit / tpm_limit is unset; 0 means no limit.
    default_rpm_limit: int = Field(default=0, ge=0)
    default_tpm_limit: int = Field(default=0, ge=0)

    # Comma-separated allow-list of plugin entry-point names; empty: every installed plugin.
    plugins: str = ""

    # One of LOG_LEVELS, any case; kept upper-case.
    log_level: str = "INFO"
    # Prometheus metrics on their own listener, "host:port" (e.g. 127.0.0.1:9464); empty: off.
    # Never on the public port.
    metrics_listen: str = Field(default="", pattern=r"^$|^[^:\s]*:\d{1,5}$")
    # /docs (Swagger UI) loads from a public CDN, so it is off by default; /openapi.json stays.
    docs_enabled: bool = False
    # "json": one JSON object per line (ts, level, logger, message), for log collectors.
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry traces over OTLP/HTTP (protobuf) to this base URL (e.g.
    # http://127.0.0.1:4318; /v1/traces is added); empty: off. Needs the `otel` extra.
    otel_endpoint: str = ""
    # On SIGTERM: requests in flight get this long to finish before they are cut (and billed
    # for what they delivered); then the publisher flushes and the process exits.
    drain_timeout_s: int = Field(default=30, ge=0)
    workers: int = Field(default=1, ge=1)

    # Credit bounds for orders (issue #3 uses these); kept here so every part reads one class.
    min_order_usd: Decimal = Decimal("1.00")
    max_order_usd: Decimal = Decimal("10000.00")

    # --- Payments, crediting and email recovery (issue #3) ---------------------------------
    # NOWPayments: offered when both the API key and the IPN secret are set.
    nowpayments_api_key: str = ""
    nowpayments_ipn_secret: str = ""
    nowpayments_base_url: str = "https://api.nowpayments.io/v1"
    nowpayments_coins: str = "btc,eth,ltc,xmr,usdttrc20"  # comma-separated, NOWPayments' codes
    nowpayments_fixed_rate: bool = False  # fixed-rate payments expire after 20 minutes
    # BTCPay Server: offered when all four are set.
    btcpay_url: str = ""
    btcpay_api_key: str = ""
    btcpay_store_id: str = ""
    btcpay_webhook_secret: str = ""
    btcpay_coins: str = "btc"  # shown in the options; the buyer picks on BTCPay's page
    btcpay_invoice_minutes: int = Field(default=60, ge=1)
    payment_http_timeout_s: float = 20.0
    # What a partially_paid payment credits: "proportional" (the share of the price that
    # arrived, rounded down) or "none" (nothing; the order stays for an operator to settle).
    partially_paid_policy: Literal["proportional", "none"] = "proportional"
    # Reconciliation: an order still open this long after its last update is re-fetched
    # from its processor, every interval, until it closes or reaches the maximum age.
    reconcile_delay_s: float = Field(default=600.0, ge=0)
    reconcile_interval_s: float = Field(default=300.0, gt=0)
    reconcile_max_age_s: float = Field(default=14 * 24 * 3600.0, gt=0)
    # Per-IP limits (in memory only; IPs are never stored), requests per window.
    rate_limit_window_s: float = Field(default=3600.0, gt=0)
    recover_rate_limit: int = Field(default=5, ge=1)
    order_rate_limit: int = Field(default=30, ge=1)
    # Mail: smtp://user:pass@host:port (STARTTLS when offered), smtps:// for implicit TLS.
    # Unset: orders refuse an email, and recovery answers as usual but sends nothing.
    smtp_url: str = ""
    smtp_from: str = "ApiFast <noreply@localhost>"
    smtp_timeout_s: float = 30.0
    # Low-balance alerts (POST /v1/key/alerts) are checked this often, off the request path.
    balance_alert_interval_s: float = Field(default=60.0, gt=0)
    mail_retry_attempts: int = Field(default=6, ge=1)
    mail_retry_base_s: float = Field(default=30.0, ge=0)
    # AES-256-GCM key ring for the key copies stored with emails: "kid:base64key,..." — the
    # first key encrypts, all decrypt, so keys can be rotated. Unset: one key derived from
    # APIFAST_SECRET_KEY.
    encryption_keys: str = ""
    # --- end of payments block ---------------------------------------------------------------

    # --- Admin panel, dashboards and the live catalog (issue #4) ----------------------------
    # Serve /admin on this router (the key holder's /dashboard is always served).
    admin_enabled: bool = True
    # Drop the session cookie's Secure flag. Honoured only for plain-http requests to a
    # loopback host (local development); anywhere else the cookie stays Secure.
    admin_insecure_cookie: bool = False
    # A session ends after this long without a request, and this long after login at most.
    admin_session_idle_s: int = Field(default=30 * 60, ge=60)
    admin_session_max_s: int = Field(default=12 * 3600, ge=300)
    # Login attempts allowed per client IP per window (in memory only; IPs are never stored).
    admin_login_rate_limit: int = Field(default=10, ge=1)
    admin_login_window_s: float = Field(default=900.0, gt=0)
    # Routers re-read the models and providers stored in Postgres when told by NOTIFY, and
    # also poll for a change this often in case a notification was missed.
    catalog_poll_s: float = Field(default=5.0, gt=0)
    # --- end of admin block ------------------------------------------------------------------

    @field_validator("log_level")
    @classmethod
    def _standard_log_level(cls, value: str) -> str:
        # Checked here, so that a bad level is the CLI's one line naming the setting, not a
        # traceback from logging or uvicorn at start-up.
        level = value.strip().upper()
        level = _LOG_LEVEL_ALIASES.get(level, level)
        if level not in LOG_LEVELS:
            raise ValueError(f"not a log level; use one of {', '.join(LOG_LEVELS)} (any case)")
        return level

    def resolved_route_health_subject(self) -> str:
        return self.route_health_subject or f"{self.nats_subject}.route_health"

    @model_validator(mode="after")
    def _retention_outlives_redelivery(self) -> Settings:
        days = self.order_retention_days
        if days and days < max(ORDER_RETENTION_MIN_DAYS, self.reconcile_max_age_s / 86400 + 1):
            raise ValueError(
                f"APIFAST_ORDER_RETENTION_DAYS={days} is too short: 0 (keep) or at least "
                f"{ORDER_RETENTION_MIN_DAYS} days, and more than APIFAST_RECONCILE_MAX_AGE_S"
            )
        return self

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()
