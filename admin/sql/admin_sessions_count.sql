SELECT count(*) FROM admin_sessions
WHERE expires_at > now() AND last_seen_at > now() - make_interval(secs => $1)
