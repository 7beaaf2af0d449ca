SELECT id, prefix, balance_usd, reserved_usd, spent_usd, disabled, rpm_limit, tpm_limit, created_at
FROM api_keys WHERE id = $1
