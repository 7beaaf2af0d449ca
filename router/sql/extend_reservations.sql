-- Keep alive the holds of requests whose usage events wait in a router's spool (NATS was
-- unreachable): they are settled when the events are replayed, so they must not be released
-- as abandoned meanwhile. $1 generation ids, $2 seconds from now.
UPDATE reservations SET expires_at = greatest(expires_at, now() + make_interval(secs => $2))
WHERE generation_id = ANY($1::text[])
