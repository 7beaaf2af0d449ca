-- Keys, the money ledger and spend reservations. Amounts are exact NUMERIC USD.

CREATE TABLE api_keys (
    id            bigserial PRIMARY KEY,
    key_hash      bytea NOT NULL UNIQUE,          -- HMAC-SHA256(server secret, key)
    prefix        text NOT NULL,                  -- first characters, for admins to find a key
    balance_usd   numeric(30, 12) NOT NULL DEFAULT 0,
    reserved_usd  numeric(30, 12) NOT NULL DEFAULT 0 CHECK (reserved_usd >= 0),
    spent_usd     numeric(30, 12) NOT NULL DEFAULT 0,
    rpm_limit     integer CHECK (rpm_limit > 0),  -- NULL: the server default
    tpm_limit     integer CHECK (tpm_limit > 0),
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_prefix ON api_keys (prefix text_pattern_ops);

-- Every change of a balance is one row here; (kind, ref) makes each exactly-once.
CREATE TABLE ledger (
    id          bigserial PRIMARY KEY,
    key_id      bigint NOT NULL REFERENCES api_keys (id),
    kind        text NOT NULL,        -- usage | payment | initial_credit | admin_credit | admin_debit | ...
    ref         text NOT NULL,        -- generation id, processor payment id, ...
    amount_usd  numeric(30, 12) NOT NULL,  -- signed: credits > 0, debits < 0
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, ref)
);
CREATE INDEX ledger_key_time ON ledger (key_id, created_at);

-- Money held for requests in flight; settled by the meter, or released after expires_at.
CREATE TABLE reservations (
    generation_id  text PRIMARY KEY,
    key_id         bigint NOT NULL REFERENCES api_keys (id),
    amount_usd     numeric(30, 12) NOT NULL CHECK (amount_usd >= 0),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (expires_at);

-- One round trip on the request path: authenticate the key and hold up to p_max of its
-- balance (at least p_min). Status: ok | unknown | disabled | insufficient.
CREATE FUNCTION apifast_reserve(
    p_key_hash bytea, p_generation_id text, p_min numeric, p_max numeric, p_ttl_s integer
) RETURNS TABLE (
    status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer
) LANGUAGE plpgsql AS $$
DECLARE
    k record;
    amount numeric;
BEGIN
    SELECT a.id, a.balance_usd - a.reserved_usd AS available, a.disabled, a.rpm_limit, a.tpm_limit
      INTO k FROM api_keys a WHERE a.key_hash = p_key_hash FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::bigint, 0::numeric, 0::numeric, NULL::int, NULL::int;
        RETURN;
    END IF;
    IF k.disabled THEN
        RETURN QUERY SELECT 'disabled'::text, k.id, 0::numeric, k.available, k.rpm_limit, k.tpm_limit;
        RETURN;
    END IF;
    IF k.available < p_min OR k.available <= 0 THEN
        RETURN QUERY SELECT 'insufficient'::text, k.id, 0::numeric, k.available, k.rpm_limit, k.tpm_limit;
        RETURN;
    END IF;
    amount := least(p_max, k.available);
    UPDATE api_keys SET reserved_usd = api_keys.reserved_usd + amount WHERE id = k.id;
    INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at)
        VALUES (p_generation_id, k.id, amount, now() + make_interval(secs => p_ttl_s));
    RETURN QUERY SELECT 'ok'::text, k.id, amount, k.available, k.rpm_limit, k.tpm_limit;
END;
$$;
