-- Keep this router's leases alive for $2 more seconds (the caller locks their keys first;
-- a longer life, given while the lease's events wait in a spool, is kept).
-- $1 lease ids. Returns the ids renewed: a missing one has expired and was released.
UPDATE reservations
SET expires_at = greatest(expires_at, now() + make_interval(secs => $2))
WHERE generation_id = ANY($1::text[])
RETURNING generation_id
