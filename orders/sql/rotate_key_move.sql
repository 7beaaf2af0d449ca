-- Move a key's balance, spend, limits, rate windows, orders and sub-keys to its successor,
-- once ($3 = the rotation's ref), record the lineage (the successor reads the old key's
-- history: apifast/sql/key_history.sql), and leave the old key disabled and empty.
-- Each move of money is a ledger row. $1 old key id, $2 new key id, $3 ref, $4 the balance.
WITH out_row AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    VALUES ($1, 'rotation_out', $3, -$4::numeric, 'key rotated')
), in_row AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    VALUES ($2, 'rotation_in', $3, $4::numeric, 'key rotated')
), old_key AS (
    UPDATE api_keys SET balance_usd = balance_usd - $4::numeric, spent_usd = 0, disabled = true,
        rotating = false
    WHERE id = $1
), orders_moved AS (
    UPDATE orders SET key_id = $2 WHERE key_id = $1
), children_moved AS (
    -- The sub-keys keep their keys, caps and spend; they now draw on the new key.
    UPDATE api_keys SET parent_id = $2 WHERE parent_id = $1
), windows_moved AS (
    -- This minute's requests and tokens count on: a rotation does not reset the rpm/tpm limit.
    UPDATE key_rate_windows SET key_id = $2 WHERE key_id = $1
), lineage AS (
    -- Every statement here sees the table as it was before it: the old key's list is read
    -- once, given to the new key with the old key itself, and emptied.
    INSERT INTO key_predecessors (key_id, predecessor_id)
    SELECT $2, predecessor_id FROM key_predecessors WHERE key_id = $1
    UNION ALL SELECT $2, $1
), lineage_moved AS (
    DELETE FROM key_predecessors WHERE key_id = $1
)
UPDATE api_keys n SET balance_usd = n.balance_usd + $4::numeric,
       spent_usd = n.spent_usd + o.spent_usd,
       rpm_limit = o.rpm_limit, tpm_limit = o.tpm_limit
FROM api_keys o WHERE n.id = $2 AND o.id = $1
