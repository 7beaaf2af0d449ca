-- Ledger retention: up to $2 rows booked before $1 are deleted and their amounts added to
-- their key's one carried-forward row (created or topped up, dated $1), so that each key's
-- ledger still sums to what it summed to before. Balances (api_keys) are not touched.
WITH gone AS (
    DELETE FROM ledger
    WHERE id IN (
        SELECT id FROM ledger
        WHERE created_at < $1 AND kind <> 'carried_forward'
        ORDER BY created_at
        LIMIT $2
    )
    RETURNING key_id, amount_usd
), per_key AS (
    SELECT key_id, sum(amount_usd) AS amount, count(*) AS n FROM gone GROUP BY key_id
), carried AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason, created_at)
    SELECT key_id, 'carried_forward', 'carried_forward:' || key_id, amount,
           'the sum of the rows before the ledger retention', $1
    FROM per_key
    ON CONFLICT (kind, ref) DO UPDATE
        SET amount_usd = ledger.amount_usd + excluded.amount_usd,
            created_at = greatest(ledger.created_at, excluded.created_at)
    RETURNING 1
)
SELECT coalesce((SELECT sum(n) FROM per_key), 0)::bigint AS deleted,
       (SELECT count(*) FROM carried) AS keys
