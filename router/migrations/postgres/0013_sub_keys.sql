-- Sub-keys (docs/billing.md, "Sub-keys"): a key holder's child keys. A child is a row of
-- api_keys with parent_id set and no balance of its own: its holds are reservations against
-- the parent's row (reservations.key_id = the parent), tagged with the child
-- (reservations.sub_key_id), and checked against the child's caps under the parent's row
-- lock. The meter debits the parent (one ledger row, tagged with the child) and adds to the
-- child's spent_usd and its day's row in sub_key_daily, in the same transaction.
-- The label is the holder's own note: it lives here only, never in events or ClickHouse.
ALTER TABLE api_keys
    ADD COLUMN parent_id     bigint REFERENCES api_keys (id),
    ADD COLUMN public_id     text UNIQUE,          -- "sk_" + random: the id the holder sees
    ADD COLUMN label         text,
    ADD COLUMN spend_cap_usd numeric(30, 12) CHECK (spend_cap_usd >= 0),  -- NULL: no cap
    ADD COLUMN daily_cap_usd numeric(30, 12) CHECK (daily_cap_usd >= 0),  -- per UTC day
    ADD COLUMN expires_at    timestamptz,
    ADD COLUMN allowed_models text[],              -- public model ids; NULL: every model
    ADD COLUMN deleted_at    timestamptz;          -- kept so events in flight still debit
CREATE INDEX api_keys_parent ON api_keys (parent_id) WHERE parent_id IS NOT NULL;

ALTER TABLE reservations ADD COLUMN sub_key_id bigint;
CREATE INDEX reservations_sub_key ON reservations (sub_key_id) WHERE sub_key_id IS NOT NULL;
ALTER TABLE ledger ADD COLUMN sub_key_id bigint;

-- A child's spend per UTC day of its debits, for the daily cap and GET /v1/keys.
CREATE TABLE sub_key_daily (
    key_id     bigint NOT NULL REFERENCES api_keys (id),
    day        date NOT NULL,
    spent_usd  numeric(30, 12) NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);

-- apifast_reserve_batch (0009) that knows sub-keys and the model asked for ($8, '' for
-- none). A key of its own is held exactly as in 0009. A sub-key is refused when it is
-- disabled, expired ('expired'), not allowed the model ('model_not_allowed') or its parent
-- is disabled ('parent_disabled'); otherwise its hold is taken on the parent's locked row,
-- at most what the parent has available and what the child's caps leave
-- (spend_cap - spent - held, daily_cap - spent today - held); status 'spend_cap' or
-- 'daily_cap' (reserved_usd: the child's holds in flight, available_usd: what the cap
-- leaves) when that is below p_min. The child's rpm limit (or the parent's, the lower one)
-- is counted in key_rate_windows under the child's id. Rows are locked in order of the
-- billed key's hash (the parent's for a child), the order every other writer locks keys in;
-- a child's own row is only read. key_id is the calling key (the child), parent_id the
-- billed key for a child (NULL otherwise).
-- Kept next to the 7-argument version of 0009, which an older router may still call: it
-- sees a child as a key with no balance, and refuses it.
CREATE OR REPLACE FUNCTION apifast_reserve_batch(
    p_key_hashes bytea[], p_generation_ids text[], p_mins numeric[], p_maxs numeric[],
    p_ttl_s integer, p_default_rpm integer, p_default_tpm integer, p_models text[]
) RETURNS TABLE (
    i integer, status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer, parent_id bigint
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
                                NULL::int, NULL::int, NULL::bigint;
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
                                    k.rpm_limit, k.tpm_limit, NULL::bigint;
                CONTINUE;
            END IF;
            cap_left := NULL;
            rpm := coalesce(k.rpm_limit, nullif(p_default_rpm, 0));
        ELSE
            IF c.parent_id <> k.id OR c.deleted_at IS NOT NULL THEN
                RETURN QUERY SELECT j, 'unknown'::text, NULL::bigint, 0::numeric, 0::numeric,
                                    NULL::int, NULL::int, NULL::bigint;
                CONTINUE;
            END IF;
            IF c.disabled THEN
                RETURN QUERY SELECT j, 'disabled'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id;
                CONTINUE;
            END IF;
            IF c.expires_at IS NOT NULL AND c.expires_at <= now() THEN
                RETURN QUERY SELECT j, 'expired'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id;
                CONTINUE;
            END IF;
            IF c.allowed_models IS NOT NULL AND p_models IS NOT NULL
               AND coalesce(p_models[j], '') <> '' AND NOT (p_models[j] = ANY (c.allowed_models))
            THEN
                RETURN QUERY SELECT j, 'model_not_allowed'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id;
                CONTINUE;
            END IF;
            IF k.disabled THEN
                RETURN QUERY SELECT j, 'parent_disabled'::text, c.id, 0::numeric, 0::numeric,
                                    c.rpm_limit, k.tpm_limit, k.id;
                CONTINUE;
            END IF;
            cap_total := c.spend_cap_usd - c.spent_usd - c.held;
            cap_day := c.daily_cap_usd - c.spent_today - c.held;
            cap_left := least(cap_total, cap_day);  -- least() skips NULLs: no cap
            rpm := coalesce(least(c.rpm_limit, k.rpm_limit), nullif(p_default_rpm, 0));
        END IF;
        IF k.available < p_mins[j] OR k.available <= 0 THEN
            RETURN QUERY SELECT j, 'insufficient'::text, c.id, k.held, k.available,
                                k.rpm_limit, k.tpm_limit, c.parent_id;
            CONTINUE;
        END IF;
        IF cap_left IS NOT NULL AND (cap_left < p_mins[j] OR cap_left <= 0) THEN
            RETURN QUERY SELECT j,
                (CASE WHEN cap_day IS NOT NULL AND cap_day = cap_left THEN 'daily_cap'
                      ELSE 'spend_cap' END)::text,
                c.id, c.held, cap_left, rpm, k.tpm_limit, k.id;
            CONTINUE;
        END IF;
        tpm := coalesce(k.tpm_limit, nullif(p_default_tpm, 0));
        IF rpm IS NOT NULL OR tpm IS NOT NULL THEN
            INSERT INTO key_rate_windows AS r (key_id, minute, requests)
                VALUES (c.id, this_minute, 1)
            ON CONFLICT ON CONSTRAINT key_rate_windows_pkey DO UPDATE SET requests = r.requests + 1
                WHERE (rpm IS NULL OR r.requests < rpm) AND (tpm IS NULL OR r.tokens < tpm)
            RETURNING r.requests INTO w;
            IF NOT FOUND THEN
                RETURN QUERY SELECT j, 'rate_limited'::text, c.id, 0::numeric, k.available,
                                    rpm, k.tpm_limit, c.parent_id;
                CONTINUE;
            END IF;
        END IF;
        amount := least(p_maxs[j], k.available, cap_left);
        UPDATE api_keys SET reserved_usd = api_keys.reserved_usd + amount WHERE id = k.id;
        INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at, sub_key_id)
            VALUES (p_generation_ids[j], k.id, amount, expires,
                    CASE WHEN c.parent_id IS NULL THEN NULL ELSE c.id END);
        RETURN QUERY SELECT j, 'ok'::text, c.id, amount, least(k.available, cap_left),
                            (CASE WHEN c.parent_id IS NULL THEN k.rpm_limit ELSE rpm END),
                            k.tpm_limit, c.parent_id;
    END LOOP;
END;
$$;

-- One request: the batch of one (same rules).
CREATE OR REPLACE FUNCTION apifast_reserve(
    p_key_hash bytea, p_generation_id text, p_min numeric, p_max numeric, p_ttl_s integer,
    p_default_rpm integer, p_default_tpm integer, p_model text
) RETURNS TABLE (
    status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer, parent_id bigint
) LANGUAGE sql AS $$
    SELECT b.status, b.key_id, b.reserved_usd, b.available_usd, b.rpm_limit, b.tpm_limit,
           b.parent_id
    FROM apifast_reserve_batch(ARRAY[p_key_hash], ARRAY[p_generation_id], ARRAY[p_min],
                               ARRAY[p_max], p_ttl_s, p_default_rpm, p_default_tpm,
                               ARRAY[p_model]) b
$$;
