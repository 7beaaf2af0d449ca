-- Credit (or, with a negative amount, debit) a key once per (kind, ref).
WITH ins AS (
    INSERT INTO ledger (key_id, kind, ref, amount_usd, reason)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (kind, ref) DO NOTHING
    RETURNING key_id, amount_usd
)
UPDATE api_keys k SET balance_usd = k.balance_usd + ins.amount_usd
FROM ins WHERE k.id = ins.key_id
RETURNING k.balance_usd
