-- Newest first; $1 an id to page before (NULL: the newest), $2 an action filter (NULL: all).
SELECT id, at, session_id, action, target, detail
FROM admin_audit
WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR action = $2)
ORDER BY id DESC
LIMIT $3
