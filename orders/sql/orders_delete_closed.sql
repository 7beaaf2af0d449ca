-- Order retention: up to $2 orders closed before $1, with their payments and history. An
-- open order is never deleted, however old. Returns how many orders went.
WITH old AS (
    SELECT id FROM orders
    WHERE closed_at IS NOT NULL AND closed_at < $1
    ORDER BY closed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), events AS (
    DELETE FROM order_events e USING old WHERE e.order_id = old.id RETURNING 1
), pays AS (
    DELETE FROM payments p USING old WHERE p.order_id = old.id RETURNING 1
), gone AS (
    DELETE FROM orders o USING old WHERE o.id = old.id RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS orders, (SELECT count(*) FROM pays) AS payments,
       (SELECT count(*) FROM events) AS events
