-- A sub-key of $1 (the parent's id), with no balance of its own.
-- $2 key hash, $3 prefix, $4 public id, $5 label, $6 spend cap, $7 daily cap, $8 rpm limit,
-- $9 expiry, $10 allowed models.
INSERT INTO api_keys (key_hash, prefix, parent_id, public_id, label, spend_cap_usd,
                      daily_cap_usd, rpm_limit, expires_at, allowed_models)
VALUES ($2, $3, $1, $4, $5, $6, $7, $8, $9, $10)
RETURNING id, created_at
