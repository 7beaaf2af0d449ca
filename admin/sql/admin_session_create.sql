-- $1 SHA-256 of the token, $2 the absolute lifetime in seconds.
INSERT INTO admin_sessions (token_hash, expires_at)
VALUES ($1, now() + make_interval(secs => $2))
RETURNING id, expires_at
