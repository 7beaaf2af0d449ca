-- Debit a batch of metered requests exactly once: the ledger's UNIQUE (kind, ref) drops
-- events already counted, and each event's reservation is released with its debit. The
-- debit never exceeds the event's hold; what an upstream reported beyond it is recorded
-- in usage_overages instead of being charged. A settled stream's checkpoint goes too. An
-- event served from a router's balance lease ($6, '' for none) takes its cost out of that
-- lease's hold: the money it held is spent now (docs/billing.md, "Balance leases").
-- The tokens of rate-limited keys (those counting requests in key_rate_windows) are counted
-- toward this minute's tpm; a sub-key's toward its parent's window as well.
-- A sub-key's event is debited to its parent (the ledger row names the child in
-- sub_key_id) and added to the child's spent_usd and its UTC day in sub_key_daily, once:
-- only for the ledger rows this statement inserted. A rotated key's event is billed to its
-- successor.
-- $1 generation ids, $2 key hashes, $3 costs (already capped), $4 overages, $5 models,
-- $6 lease ids, $7 tokens (input + output).
-- Returns the generation ids newly counted.
WITH ev AS (
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::numeric[], $4::numeric[], $5::text[],
                         $6::text[], $7::bigint[])
        AS e(generation_id, key_hash, cost, overage, model, lease_id, tokens)
), evk AS (
    -- An event of a key rotated since (a spool replayed late, a reconcile repair) is billed
    -- to the key it was rotated to: the balance that paid for it moved there. Sub-keys are
    -- never rotated; their parent's rotation re-parents them.
    SELECT ev.*, coalesce(s.key_id, k.id) AS own_id,
           coalesce(k.parent_id, s.key_id, k.id) AS bill_id,
           CASE WHEN k.parent_id IS NULL THEN NULL ELSE k.id END AS sub_id
    FROM ev JOIN api_keys k ON k.key_hash = ev.key_hash
    LEFT JOIN key_predecessors s ON s.predecessor_id = k.id
), ins AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, sub_key_id)
    SELECT evk.bill_id, 'usage', evk.generation_id, -evk.cost, evk.sub_id
    FROM evk
    ORDER BY evk.bill_id
    ON CONFLICT (kind, ref) DO NOTHING
    RETURNING key_id, ref, amount_usd, sub_key_id
), over AS (
    INSERT INTO usage_overages (generation_id, key_id, model, overage_usd)
    SELECT ins.ref, ins.key_id, ev.model, ev.overage
    FROM ins JOIN ev ON ev.generation_id = ins.ref
    WHERE ev.overage > 0
    ON CONFLICT (generation_id) DO NOTHING
), cp AS (
    DELETE FROM stream_checkpoints c USING ins WHERE c.generation_id = ins.ref
), rel AS (
    DELETE FROM reservations r USING ins WHERE r.generation_id = ins.ref
    RETURNING r.key_id, r.amount_usd
), lease_use AS (
    SELECT ev.lease_id, sum(ev.cost) AS cost
    FROM ins JOIN ev ON ev.generation_id = ins.ref
    WHERE ev.lease_id <> '' GROUP BY ev.lease_id
), lease_cut AS (
    -- The keys are locked (lock_keys_in_order.sql), as by every change to a lease.
    SELECT r.generation_id, least(u.cost, r.amount_usd) AS amount
    FROM reservations r JOIN lease_use u ON u.lease_id = r.generation_id
), spent AS (
    UPDATE reservations r SET amount_usd = r.amount_usd - c.amount
    FROM lease_cut c WHERE r.generation_id = c.generation_id
    RETURNING r.key_id, c.amount
), used AS (
    -- Counted toward the calling key's own window and, for a sub-key, its parent's too:
    -- the parent's tpm is the total of the key and its sub-keys.
    SELECT x.key_id, sum(x.tokens) AS tokens
    FROM ins JOIN evk ON evk.generation_id = ins.ref
    CROSS JOIN LATERAL (VALUES (evk.own_id, evk.tokens, true),
                               (evk.bill_id, evk.tokens, evk.sub_id IS NOT NULL))
        AS x(key_id, tokens, counts)
    WHERE x.counts
    GROUP BY x.key_id
), sub_spent AS (
    SELECT sub_key_id, sum(-amount_usd) AS spent FROM ins
    WHERE sub_key_id IS NOT NULL GROUP BY sub_key_id
), sub_total AS (
    UPDATE api_keys k SET spent_usd = k.spent_usd + s.spent
    FROM sub_spent s WHERE k.id = s.sub_key_id
), sub_day AS (
    INSERT INTO sub_key_daily AS d (key_id, day, spent_usd)
    SELECT sub_key_id, (now() AT TIME ZONE 'UTC')::date, spent FROM sub_spent
    ON CONFLICT (key_id, day) DO UPDATE SET spent_usd = d.spent_usd + excluded.spent_usd
), counted AS (
    INSERT INTO key_rate_windows AS w (key_id, minute, tokens)
    SELECT used.key_id, floor(extract(epoch FROM now()) / 60), used.tokens FROM used
    WHERE used.tokens > 0 AND EXISTS (
        SELECT 1 FROM key_rate_windows r
        WHERE r.key_id = used.key_id AND r.minute >= floor(extract(epoch FROM now()) / 60) - 1
    )
    ON CONFLICT (key_id, minute) DO UPDATE SET tokens = w.tokens + excluded.tokens
), per_key AS (
    SELECT key_id, sum(debit) AS debit, sum(held) AS held FROM (
        SELECT key_id, -amount_usd AS debit, 0::numeric AS held FROM ins
        UNION ALL
        SELECT key_id, 0::numeric, amount_usd FROM rel
        UNION ALL
        SELECT key_id, 0::numeric, amount FROM spent
    ) x GROUP BY key_id
), upd AS (
    UPDATE api_keys k
    SET balance_usd = k.balance_usd - per_key.debit,
        spent_usd = k.spent_usd + per_key.debit,
        reserved_usd = greatest(k.reserved_usd - per_key.held, 0)
    FROM per_key WHERE k.id = per_key.key_id
    RETURNING k.id
)
SELECT ref AS generation_id FROM ins
