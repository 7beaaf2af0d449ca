-- Serialise the creation of one key's sub-keys, so that counting them and adding one cannot
-- interleave with another creation (the MAX_SUB_KEYS cap holds under concurrency). NO KEY:
-- the parent's holds (which update the row) are not blocked by more than this transaction.
SELECT id FROM api_keys WHERE id = $1 FOR NO KEY UPDATE
