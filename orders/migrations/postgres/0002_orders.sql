-- Orders (buying credit), the processor payments that pay them, their status history, and
-- the optional recovery emails. Credits themselves go to the ledger (kind 'payment').

CREATE TABLE orders (
    id              text PRIMARY KEY,                 -- "ord_" + random
    key_id          bigint NOT NULL REFERENCES api_keys (id),
    amount_usd      numeric(30, 12) NOT NULL CHECK (amount_usd > 0),
    processor       text NOT NULL,
    pay_currency    text,                             -- NULL: chosen on a hosted page
    status          text NOT NULL DEFAULT 'waiting',  -- normalized; never moves backwards
    credited_usd    numeric(30, 12) NOT NULL DEFAULT 0,
    payment_id      text,                             -- the processor's payment, when known
    invoice_id      text,                             -- the processor's hosted invoice
    pay_address     text,
    pay_amount      numeric,
    pay_extra_id    text,
    payment_url     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    closed_at       timestamptz,                      -- set with a final status
    checked_at      timestamptz                       -- last reconciliation fetch
);
CREATE INDEX orders_key_time ON orders (key_id, created_at DESC);
CREATE INDEX orders_open ON orders (created_at) WHERE closed_at IS NULL;
CREATE INDEX orders_processor_ref ON orders (processor, payment_id);

-- One row per processor payment; a repeat deposit is its own row with a parent id.
CREATE TABLE payments (
    processor          text NOT NULL,
    payment_id         text NOT NULL,
    parent_payment_id  text,
    order_id           text NOT NULL REFERENCES orders (id),
    status             text NOT NULL,
    raw_status         text,
    credited_usd       numeric(30, 12) NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (processor, payment_id)
);
CREATE INDEX payments_order ON payments (order_id);

-- Status history per order, for the admin panel and for support.
CREATE TABLE order_events (
    id            bigserial PRIMARY KEY,
    order_id      text NOT NULL REFERENCES orders (id),
    payment_id    text,
    status        text NOT NULL,
    raw_status    text,
    credited_usd  numeric(30, 12) NOT NULL DEFAULT 0,  -- credited by this event
    source        text NOT NULL,                       -- created | webhook | reconcile
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_events_order ON order_events (order_id, id);

-- Only when a buyer gave an email. The address itself is not stored: rows are found by an
-- HMAC of it, which is all recovery needs (the buyer types the address again). The key is
-- kept AES-GCM encrypted under the key ring entry `enc_key_id`, so it can be rotated.
CREATE TABLE email_keys (
    key_id          bigint PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
    email_hash      bytea NOT NULL,
    key_ciphertext  bytea NOT NULL,
    nonce           bytea NOT NULL,
    enc_key_id      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_keys_email ON email_keys (email_hash);
