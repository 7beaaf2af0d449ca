-- Claim a key for rotation by disabling it: only one request can turn it from enabled to
-- disabled, so of concurrent rotations of one key exactly one goes on (the others get no
-- row). `rotating` marks the disable as the rotation's (migration 0025). $1 the key id.
UPDATE api_keys SET disabled = true, rotating = true
WHERE id = $1 AND NOT disabled AND deleted_at IS NULL
RETURNING id
