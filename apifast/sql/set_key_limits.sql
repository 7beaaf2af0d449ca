UPDATE api_keys SET rpm_limit = $2, tpm_limit = $3 WHERE id = $1
