-- $1 the idle limit in seconds.
DELETE FROM admin_sessions
WHERE expires_at <= now() OR last_seen_at <= now() - make_interval(secs => $1)
