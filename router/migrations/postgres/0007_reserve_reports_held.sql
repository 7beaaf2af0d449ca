-- A refused hold reports how much of the key is held by requests in flight (in
-- reserved_usd, 0 before), so that the router can tell "the balance is held up, wait" (429
-- after a bounded wait) from "the money is gone" (402). Otherwise as in 0004.
CREATE OR REPLACE FUNCTION apifast_reserve(
    p_key_hash bytea, p_generation_id text, p_min numeric, p_max numeric, p_ttl_s integer
) RETURNS TABLE (
    status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer
) LANGUAGE plpgsql AS $$
DECLARE
    k record;
    amount numeric;
BEGIN
    -- Local to the calling transaction; no SET clause on the function, so it outlives it.
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT a.id, a.balance_usd - a.reserved_usd AS available, a.reserved_usd AS held,
           a.disabled, a.rpm_limit, a.tpm_limit
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
        RETURN QUERY SELECT 'insufficient'::text, k.id, k.held, k.available, k.rpm_limit, k.tpm_limit;
        RETURN;
    END IF;
    amount := least(p_max, k.available);
    UPDATE api_keys SET reserved_usd = api_keys.reserved_usd + amount WHERE id = k.id;
    INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at)
        VALUES (p_generation_id, k.id, amount, now() + make_interval(secs => p_ttl_s));
    RETURN QUERY SELECT 'ok'::text, k.id, amount, k.available, k.rpm_limit, k.tpm_limit;
END;
$$;

-- apifast_reserve for many requests in one round trip (the router batches the requests that
-- arrive while a batch is in flight: group commit). Same rules per request, applied in order
-- of key hash, so that concurrent batches lock keys in one order and never deadlock.
-- Row i of the result answers request i of the arrays.
CREATE OR REPLACE FUNCTION apifast_reserve_batch(
    p_key_hashes bytea[], p_generation_ids text[], p_mins numeric[], p_maxs numeric[],
    p_ttl_s integer
) RETURNS TABLE (
    i integer, status text, key_id bigint, reserved_usd numeric, available_usd numeric,
    rpm_limit integer, tpm_limit integer
) LANGUAGE plpgsql AS $$
DECLARE
    k record;
    amount numeric;
    j integer;
    expires timestamptz := now() + make_interval(secs => p_ttl_s);
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- see above
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
        amount := least(p_maxs[j], k.available);
        UPDATE api_keys SET reserved_usd = api_keys.reserved_usd + amount WHERE id = k.id;
        INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at)
            VALUES (p_generation_ids[j], k.id, amount, expires);
        RETURN QUERY SELECT j, 'ok'::text, k.id, amount, k.available, k.rpm_limit, k.tpm_limit;
    END LOOP;
END;
$$;
