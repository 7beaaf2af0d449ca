SELECT status, key_id, reserved_usd, available_usd, rpm_limit, tpm_limit, parent_id,
       parent_rpm_limit
FROM apifast_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9)
