-- Credit (amount > 0) or debit (amount < 0) a key by hand, once per ref; a debit may not
-- take the balance below zero. A sub-key has no balance of its own (it spends its parent's):
-- it is never adjusted. $1 key id, $2 kind, $3 ref, $4 signed amount, $5 reason.
WITH k AS (
    SELECT id FROM api_keys WHERE id = $1 AND balance_usd + $4::numeric >= 0 AND parent_id IS NULL
    FOR UPDATE
), ins AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    SELECT k.id, $2, $3, $4, $5 FROM k
    ON CONFLICT (kind, ref) DO NOTHING
    RETURNING key_id, amount_usd
)
UPDATE api_keys a SET balance_usd = a.balance_usd + ins.amount_usd
FROM ins WHERE a.id = ins.key_id
RETURNING a.balance_usd
