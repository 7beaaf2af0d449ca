-- The display prefix of each of these key hashes (for operators' reports).
SELECT key_hash, prefix FROM api_keys WHERE key_hash = ANY($1::bytea[])
