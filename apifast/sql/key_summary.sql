SELECT id, balance_usd, reserved_usd, spent_usd, created_at, rpm_limit, tpm_limit, disabled,
       parent_id
FROM api_keys WHERE key_hash = $1 AND deleted_at IS NULL
