-- Per-key rate limits across all routers (docs/billing.md, "Limits"). Each key with an rpm
-- or tpm limit counts its requests and tokens per minute here: requests when their hold is
-- taken (below, under the key's row lock, so no two routers can both take the last one),
-- tokens when the meter debits them. Rows older than the previous minute are deleted by the
-- meter's sweep.
CREATE TABLE IF NOT EXISTS key_rate_windows (
    key_id    bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    minute    bigint NOT NULL,           -- floor(Unix seconds / 60), by the database's clock
    requests  integer NOT NULL DEFAULT 0,
    tokens    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, minute)
);

-- apifast_reserve_batch (0007) with the key's limits applied: a key with an rpm limit (its
-- own, else p_default_rpm; 0 = none) at its limit this minute, or with a tpm limit whose
-- tokens this minute reached it, gets status 'rate_limited' and no hold. A request refused
-- for its balance is not counted.
CREATE OR REPLACE FUNCTION apifast_reserve_batch(
    p_key_hashes bytea[], p_generation_ids text[], p_mins numeric[], p_maxs numeric[],
    p_ttl_s integer, p_default_rpm integer, p_default_tpm integer
) RETURNS TABLE (
    i integer, status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer
) LANGUAGE plpgsql AS $$
DECLARE
    k record;
    amount numeric;
    j integer;
    rpm integer;
    tpm integer;
    w record;
    expires timestamptz := now() + make_interval(secs => p_ttl_s);
    this_minute bigint := floor(extract(epoch FROM now()) / 60);
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- see 0004
    FOR j IN SELECT o.j FROM unnest(p_key_hashes) WITH ORDINALITY AS o(h, j) ORDER BY o.h, o.j
    LOOP
        SELECT a.id, a.balance_usd - a.reserved_usd AS available, a.reserved_usd AS held,
               a.disabled, a.rpm_limit, a.tpm_limit
          INTO k FROM api_keys a WHERE a.key_hash = p_key_hashes[j] FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT j, 'unknown'::text, NULL::bigint, 0::numeric, 0::numeric,
                                NULL::int, NULL::int;
            CONTINUE;
        END IF;
        IF k.disabled THEN
            RETURN QUERY SELECT j, 'disabled'::text, k.id, 0::numeric, k.available,
                                k.rpm_limit, k.tpm_limit;
            CONTINUE;
        END IF;
        IF k.available < p_mins[j] OR k.available <= 0 THEN
            RETURN QUERY SELECT j, 'insufficient'::text, k.id, k.held, k.available,
                                k.rpm_limit, k.tpm_limit;
            CONTINUE;
        END IF;
        rpm := coalesce(k.rpm_limit, nullif(p_default_rpm, 0));
        tpm := coalesce(k.tpm_limit, nullif(p_default_tpm, 0));
        IF rpm IS NOT NULL OR tpm IS NOT NULL THEN
            INSERT INTO key_rate_windows AS r (key_id, minute, requests)
                VALUES (k.id, this_minute, 1)
            ON CONFLICT ON CONSTRAINT key_rate_windows_pkey DO UPDATE SET requests = r.requests + 1
                WHERE (rpm IS NULL OR r.requests < rpm) AND (tpm IS NULL OR r.tokens < tpm)
            RETURNING r.requests INTO w;
            IF NOT FOUND THEN
                RETURN QUERY SELECT j, 'rate_limited'::text, k.id, 0::numeric, k.available,
                                    k.rpm_limit, k.tpm_limit;
                CONTINUE;
            END IF;
        END IF;
        amount := least(p_maxs[j], k.available);
        UPDATE api_keys SET reserved_usd = api_keys.reserved_usd + amount WHERE id = k.id;
        INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at)
            VALUES (p_generation_ids[j], k.id, amount, expires);
        RETURN QUERY SELECT j, 'ok'::text, k.id, amount, k.available, k.rpm_limit, k.tpm_limit;
    END LOOP;
END;
$$;

-- One request: the batch of one (same rules).
CREATE OR REPLACE FUNCTION apifast_reserve(
    p_key_hash bytea, p_generation_id text, p_min numeric, p_max numeric, p_ttl_s integer,
    p_default_rpm integer, p_default_tpm integer
) RETURNS TABLE (
    status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer
) LANGUAGE sql AS $$
    SELECT b.status, b.key_id, b.reserved_usd, b.available_usd, b.rpm_limit, b.tpm_limit
    FROM apifast_reserve_batch(ARRAY[p_key_hash], ARRAY[p_generation_id], ARRAY[p_min],
                               ARRAY[p_max], p_ttl_s, p_default_rpm, p_default_tpm) b
$$;
