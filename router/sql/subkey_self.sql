-- A sub-key's view of itself (GET /v1/key with a sub-key): its own caps and spend, never
-- its parent's balance nor its label (the holder's note). $1 the sub-key's id.
SELECT a.public_id, a.spend_cap_usd, a.daily_cap_usd, a.rpm_limit, a.expires_at,
       a.allowed_models, a.disabled, a.created_at, a.spent_usd,
       coalesce((SELECT d.spent_usd FROM sub_key_daily d
                 WHERE d.key_id = a.id AND d.day = (now() AT TIME ZONE 'UTC')::date), 0)
           AS spent_today_usd,
       coalesce((SELECT sum(r.amount_usd) FROM reservations r WHERE r.sub_key_id = a.id), 0)
           AS held_usd
FROM api_keys a WHERE a.id = $1
