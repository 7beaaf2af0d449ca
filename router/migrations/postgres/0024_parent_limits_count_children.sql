-- A parent's rpm and tpm limits (its own, else APIFAST_DEFAULT_RPM_LIMIT / _TPM_LIMIT) are
-- the total of the key and all its sub-keys (docs/billing.md, "Limits"): a sub-key's hold
-- counts its request in its parent's window as well as (when it has its own rpm_limit, a
-- further cap on its share) in its own, and is refused when either is full. The meter adds
-- a sub-key's tokens to its parent's window too (metering/sql/settle_usage_batch.sql).
-- A key without sub-keys is counted exactly as before (0019): one window row, one upsert.
-- The functions gain a column, parent_rpm_limit (a sub-key's parent's own rpm_limit, for
-- the router's own window of the family), so they are dropped and made again; the rest is
-- 0019. Routers that do not read the new column are unaffected.
DROP FUNCTION IF EXISTS apifast_reserve(bytea, text, numeric, numeric, integer, integer,
                                        integer, text, boolean);
DROP FUNCTION IF EXISTS apifast_reserve_batch(bytea[], text[], numeric[], numeric[], integer,
                                              integer, integer, text[]);
DROP FUNCTION IF EXISTS apifast_reserve_batch(bytea[], text[], numeric[], numeric[], integer,
                                              integer, integer, text[], boolean[]);

CREATE FUNCTION apifast_reserve_batch(
    p_key_hashes bytea[], p_generation_ids text[], p_mins numeric[], p_maxs numeric[],
    p_ttl_s integer, p_default_rpm integer, p_default_tpm integer, p_models text[],
    p_counts boolean[]
) RETURNS TABLE (
    i integer, status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer, parent_id bigint, parent_rpm_limit integer
) LANGUAGE plpgsql AS $$
DECLARE
    k record;          -- the billed key, locked
    c record;          -- the calling key as read (a child: its caps and spend)
    bill_id bigint;
    amount numeric;
    cap_left numeric;
    cap_total numeric;
    cap_day numeric;
    j integer;
    n integer;
    rpm integer;
    tpm integer;
    prpm integer;      -- a child's parent's rpm (its own, else the default): the family's
    w record;
    expires timestamptz := now() + make_interval(secs => p_ttl_s);
    this_minute bigint := floor(extract(epoch FROM now()) / 60);
    today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- see 0004
    FOR j IN
        SELECT o.j FROM unnest(p_key_hashes) WITH ORDINALITY AS o(h, j)
        LEFT JOIN api_keys s ON s.key_hash = o.h
        LEFT JOIN api_keys p ON p.id = s.parent_id
        ORDER BY coalesce(p.key_hash, o.h), o.h, o.j
    LOOP
        SELECT a.id, a.parent_id, a.deleted_at INTO c
          FROM api_keys a WHERE a.key_hash = p_key_hashes[j];
        IF NOT FOUND OR c.deleted_at IS NOT NULL THEN
            RETURN QUERY SELECT j, 'unknown'::text, NULL::bigint, 0::numeric, 0::numeric,
                                NULL::int, NULL::int, NULL::bigint, NULL::int;
            CONTINUE;
        END IF;
        bill_id := coalesce(c.parent_id, c.id);
        n := 0;
        LOOP
            SELECT a.id, a.balance_usd - a.reserved_usd AS available, a.reserved_usd AS held,
                   a.disabled, a.rpm_limit, a.tpm_limit
              INTO k FROM api_keys a WHERE a.id = bill_id FOR UPDATE;
            EXIT WHEN c.parent_id IS NULL;
            -- Read the child under its parent's lock: its spend and holds are changed only
            -- under that lock (the meter, the holds), so the caps below are exact.
            SELECT a.id, a.parent_id, a.disabled, a.deleted_at, a.expires_at, a.rpm_limit,
                   a.spend_cap_usd, a.daily_cap_usd, a.allowed_models, a.spent_usd,
                   coalesce((SELECT sum(r.amount_usd) FROM reservations r
                             WHERE r.sub_key_id = a.id), 0) AS held,
                   coalesce((SELECT d.spent_usd FROM sub_key_daily d
                             WHERE d.key_id = a.id AND d.day = today), 0) AS spent_today
              INTO c FROM api_keys a WHERE a.id = c.id;
            -- A rotation moved the child to a new parent while this waited: lock that one.
            EXIT WHEN c.parent_id = bill_id OR n >= 2;
            bill_id := c.parent_id;
            n := n + 1;
        END LOOP;
        IF c.parent_id IS NULL THEN
            IF k.disabled THEN
                RETURN QUERY SELECT j, 'disabled'::text, k.id, 0::numeric, k.available,
                                    k.rpm_limit, k.tpm_limit, NULL::bigint, NULL::int;
                CONTINUE;
            END IF;
            cap_left := NULL;
            rpm := coalesce(k.rpm_limit, nullif(p_default_rpm, 0));
        ELSE
            IF c.parent_id <> k.id OR c.deleted_at IS NOT NULL THEN
                RETURN QUERY SELECT j, 'unknown'::text, NULL::bigint, 0::numeric, 0::numeric,
                                    NULL::int, NULL::int, NULL::bigint, NULL::int;
                CONTINUE;
            END IF;
            IF c.disabled THEN
                RETURN QUERY SELECT j, 'disabled'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id, NULL::int;
                CONTINUE;
            END IF;
            IF c.expires_at IS NOT NULL AND c.expires_at <= now() THEN
                RETURN QUERY SELECT j, 'expired'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id, NULL::int;
                CONTINUE;
            END IF;
            IF c.allowed_models IS NOT NULL AND p_models IS NOT NULL
               AND coalesce(p_models[j], '') <> '' AND NOT (p_models[j] = ANY (c.allowed_models))
            THEN
                RETURN QUERY SELECT j, 'model_not_allowed'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id, NULL::int;
                CONTINUE;
            END IF;
            IF k.disabled THEN
                RETURN QUERY SELECT j, 'parent_disabled'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id, NULL::int;
                CONTINUE;
            END IF;
            cap_total := c.spend_cap_usd - c.spent_usd - c.held;
            cap_day := c.daily_cap_usd - c.spent_today - c.held;
            cap_left := least(cap_total, cap_day);  -- least() skips NULLs: no cap
            rpm := coalesce(least(c.rpm_limit, k.rpm_limit), nullif(p_default_rpm, 0));
        END IF;
        IF k.available < p_mins[j] OR k.available <= 0 THEN
            RETURN QUERY SELECT j, 'insufficient'::text, c.id, k.held, k.available,
                                k.rpm_limit, k.tpm_limit, c.parent_id, NULL::int;
            CONTINUE;
        END IF;
        IF cap_left IS NOT NULL AND (cap_left < p_mins[j] OR cap_left <= 0) THEN
            RETURN QUERY SELECT j,
                (CASE WHEN cap_day IS NOT NULL AND cap_day = cap_left THEN 'daily_cap'
                      ELSE 'spend_cap' END)::text,
                c.id, c.held, cap_left, rpm, k.tpm_limit, k.id, NULL::int;
            CONTINUE;
        END IF;
        tpm := coalesce(k.tpm_limit, nullif(p_default_tpm, 0));
        -- A fallback model's hold (p_counts[j] false): its request was counted, and
        -- admitted, by the hold of the first model that could be held.
        IF c.parent_id IS NULL THEN
            IF (rpm IS NOT NULL OR tpm IS NOT NULL) AND coalesce(p_counts[j], true) THEN
                INSERT INTO key_rate_windows AS r (key_id, minute, requests)
                    VALUES (c.id, this_minute, 1)
                ON CONFLICT ON CONSTRAINT key_rate_windows_pkey
                    DO UPDATE SET requests = r.requests + 1
                    WHERE (rpm IS NULL OR r.requests < rpm) AND (tpm IS NULL OR r.tokens < tpm)
                RETURNING r.requests INTO w;
                IF NOT FOUND THEN
                    RETURN QUERY SELECT j, 'rate_limited'::text, c.id, 0::numeric, k.available,
                                        rpm, k.tpm_limit, c.parent_id, NULL::int;
                    CONTINUE;
                END IF;
            END IF;
        ELSIF coalesce(p_counts[j], true) THEN
            -- A child counts in its parent's window too: the parent's limits (its own, else
            -- the defaults) are the total of the family. Its own rpm_limit caps its share, in
            -- its own window. Both windows' requests change only here, under the parent's
            -- row lock (held above), so reading the child's first is exact.
            prpm := coalesce(k.rpm_limit, nullif(p_default_rpm, 0));
            IF c.rpm_limit IS NOT NULL AND coalesce(
                (SELECT r.requests FROM key_rate_windows r
                 WHERE r.key_id = c.id AND r.minute = this_minute), 0) >= c.rpm_limit
            THEN
                RETURN QUERY SELECT j, 'rate_limited'::text, c.id, 0::numeric, k.available,
                                    rpm, k.tpm_limit, c.parent_id, k.rpm_limit;
                CONTINUE;
            END IF;
            IF prpm IS NOT NULL OR tpm IS NOT NULL THEN
                INSERT INTO key_rate_windows AS r (key_id, minute, requests)
                    VALUES (k.id, this_minute, 1)
                ON CONFLICT ON CONSTRAINT key_rate_windows_pkey
                    DO UPDATE SET requests = r.requests + 1
                    WHERE (prpm IS NULL OR r.requests < prpm) AND (tpm IS NULL OR r.tokens < tpm)
                RETURNING r.requests INTO w;
                IF NOT FOUND THEN
                    RETURN QUERY SELECT j, 'rate_limited'::text, c.id, 0::numeric, k.available,
                                        rpm, k.tpm_limit, c.parent_id, k.rpm_limit;
                    CONTINUE;
                END IF;
            END IF;
            IF c.rpm_limit IS NOT NULL THEN
                INSERT INTO key_rate_windows AS r (key_id, minute, requests)
                    VALUES (c.id, this_minute, 1)
                ON CONFLICT ON CONSTRAINT key_rate_windows_pkey
                    DO UPDATE SET requests = r.requests + 1;
            END IF;
        END IF;
        amount := least(p_maxs[j], k.available, cap_left);
        UPDATE api_keys SET reserved_usd = api_keys.reserved_usd + amount WHERE id = k.id;
        INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at, sub_key_id)
            VALUES (p_generation_ids[j], k.id, amount, expires,
                    CASE WHEN c.parent_id IS NULL THEN NULL ELSE c.id END);
        RETURN QUERY SELECT j, 'ok'::text, c.id, amount, least(k.available, cap_left),
                            (CASE WHEN c.parent_id IS NULL THEN k.rpm_limit ELSE rpm END),
                            k.tpm_limit, c.parent_id,
                            (CASE WHEN c.parent_id IS NULL THEN NULL ELSE k.rpm_limit END);
    END LOOP;
END;
$$;

CREATE FUNCTION apifast_reserve_batch(
    p_key_hashes bytea[], p_generation_ids text[], p_mins numeric[], p_maxs numeric[],
    p_ttl_s integer, p_default_rpm integer, p_default_tpm integer, p_models text[]
) RETURNS TABLE (
    i integer, status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer, parent_id bigint, parent_rpm_limit integer
) LANGUAGE sql AS $$
    SELECT * FROM apifast_reserve_batch(p_key_hashes, p_generation_ids, p_mins, p_maxs,
                                        p_ttl_s, p_default_rpm, p_default_tpm, p_models,
                                        NULL::boolean[])
$$;

-- One request: the batch of one (same rules).
CREATE FUNCTION apifast_reserve(
    p_key_hash bytea, p_generation_id text, p_min numeric, p_max numeric, p_ttl_s integer,
    p_default_rpm integer, p_default_tpm integer, p_model text, p_count boolean
) RETURNS TABLE (
    status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer, parent_id bigint, parent_rpm_limit integer
) LANGUAGE sql AS $$
    SELECT b.status, b.key_id, b.reserved_usd, b.available_usd, b.rpm_limit, b.tpm_limit,
           b.parent_id, b.parent_rpm_limit
    FROM apifast_reserve_batch(ARRAY[p_key_hash], ARRAY[p_generation_id], ARRAY[p_min],
                               ARRAY[p_max], p_ttl_s, p_default_rpm, p_default_tpm,
                               ARRAY[p_model], ARRAY[p_count]) b
$$;
