-- A live session (within both its absolute and its idle limit, $2 seconds) is touched and
-- returned; an expired one is not found.
UPDATE admin_sessions SET last_seen_at = now()
WHERE token_hash = $1
  AND expires_at > now()
  AND last_seen_at > now() - make_interval(secs => $2)
RETURNING id, created_at, expires_at
