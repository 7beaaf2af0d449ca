-- Sub-key retention: up to $1 rows of sub_key_daily for days before the day before yesterday
-- (UTC, by the database's clock, as the holds and the meter date them). Only today's row is
-- read (the daily cap, GET /v1/keys, GET /v1/key); the two days before are kept as a margin,
-- so that no statement that took its day from now() before midnight has the row vanish
-- under it. Returns how many rows went.
WITH gone AS (
    DELETE FROM sub_key_daily
    WHERE (key_id, day) IN (
        SELECT key_id, day FROM sub_key_daily
        WHERE day < (now() AT TIME ZONE 'UTC')::date - 2
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone
