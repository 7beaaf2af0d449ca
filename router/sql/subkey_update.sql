-- Change a sub-key's settings: each $n with its "set" flag; a NULL value clears it.
-- $1 parent id, $2 public id, $3/$4 disabled, $5/$6 label, $7/$8 spend cap,
-- $9/$10 daily cap, $11/$12 rpm limit, $13/$14 expiry, $15/$16 allowed models.
UPDATE api_keys SET
    disabled = CASE WHEN $3 THEN $4::boolean ELSE disabled END,
    label = CASE WHEN $5 THEN $6::text ELSE label END,
    spend_cap_usd = CASE WHEN $7 THEN $8::numeric ELSE spend_cap_usd END,
    daily_cap_usd = CASE WHEN $9 THEN $10::numeric ELSE daily_cap_usd END,
    rpm_limit = CASE WHEN $11 THEN $12::integer ELSE rpm_limit END,
    expires_at = CASE WHEN $13 THEN $14::timestamptz ELSE expires_at END,
    allowed_models = CASE WHEN $15 THEN $16::text[] ELSE allowed_models END
WHERE parent_id = $1 AND public_id = $2 AND deleted_at IS NULL
RETURNING id
