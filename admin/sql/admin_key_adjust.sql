-- Credit (amount > 0) or debit (amount < 0) a key by hand, once per ref. A debit takes at
-- most the key's available balance: its balance less what holds and routers' balance
-- leases reserve (reserved_usd). Each metered request is debited at most its hold, so the
-- balance then stays >= 0 whatever is in flight. The key's row lock orders this against
-- every hold and debit. A sub-key has no balance of its own (it spends its parent's): it
-- is never adjusted. $1 key id, $2 kind, $3 ref, $4 signed amount, $5 reason.
-- One row when the key exists: done, balance_usd (after the change when done),
-- reserved_usd, leased_usd (the part of reserved_usd in leases), sub_key.
WITH k AS (
    SELECT id, balance_usd, reserved_usd, parent_id IS NOT NULL AS sub_key
    FROM api_keys WHERE id = $1
    FOR UPDATE
), ok AS (
    SELECT id FROM k
    WHERE NOT sub_key AND ($4::numeric >= 0 OR balance_usd - reserved_usd + $4::numeric >= 0)
), ins AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    SELECT ok.id, $2, $3, $4, $5 FROM ok
    ON CONFLICT (kind, ref) DO NOTHING
    RETURNING key_id, amount_usd
), upd AS (
    UPDATE api_keys a SET balance_usd = a.balance_usd + ins.amount_usd
    FROM ins WHERE a.id = ins.key_id
    RETURNING a.balance_usd
)
SELECT EXISTS (SELECT 1 FROM upd) AS done,
       coalesce((SELECT balance_usd FROM upd), k.balance_usd) AS balance_usd,
       k.reserved_usd, k.sub_key,
       (SELECT coalesce(sum(r.amount_usd), 0) FROM reservations r
        WHERE r.key_id = k.id AND r.generation_id LIKE 'lease:%') AS leased_usd
FROM k
