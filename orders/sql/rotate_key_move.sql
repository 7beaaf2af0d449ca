-- Move a key's balance, limits, orders and sub-keys to its successor, once ($3 = the rotation's ref),
-- and leave the old key disabled and empty. Each move of money is a ledger row.
-- $1 old key id, $2 new key id, $3 ref, $4 the balance moved.
WITH out_row AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    VALUES ($1, 'rotation_out', $3, -$4::numeric, 'key rotated')
), in_row AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    VALUES ($2, 'rotation_in', $3, $4::numeric, 'key rotated')
), old_key AS (
    UPDATE api_keys SET balance_usd = balance_usd - $4::numeric, disabled = true WHERE id = $1
), orders_moved AS (
    UPDATE orders SET key_id = $2 WHERE key_id = $1
), children_moved AS (
    -- The sub-keys keep their keys, caps and spend; they now draw on the new key.
    UPDATE api_keys SET parent_id = $2 WHERE parent_id = $1
)
UPDATE api_keys n SET balance_usd = n.balance_usd + $4::numeric,
       rpm_limit = o.rpm_limit, tpm_limit = o.tpm_limit
FROM api_keys o WHERE n.id = $2 AND o.id = $1
