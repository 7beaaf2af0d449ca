-- The caller's sub-keys with their usage: spent in total, today (UTC), and held by their
-- requests in flight. $1 parent id, $2 a public id to list only that one (NULL: all).
SELECT a.public_id, a.label, a.spend_cap_usd, a.daily_cap_usd, a.rpm_limit, a.expires_at,
       a.allowed_models, a.disabled, a.created_at, a.spent_usd,
       coalesce((SELECT d.spent_usd FROM sub_key_daily d
                 WHERE d.key_id = a.id AND d.day = (now() AT TIME ZONE 'UTC')::date), 0)
           AS spent_today_usd,
       coalesce((SELECT sum(r.amount_usd) FROM reservations r WHERE r.sub_key_id = a.id), 0)
           AS held_usd
FROM api_keys a
WHERE a.parent_id = $1 AND a.deleted_at IS NULL AND ($2::text IS NULL OR a.public_id = $2)
ORDER BY a.created_at, a.id
