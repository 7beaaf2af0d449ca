-- Claim open orders due for a re-fetch from their processor. SKIP LOCKED lets router
-- replicas share the work; checked_at spaces the fetches of one order.
-- $1 processors on offer, $2 delay after creation (s), $3 maximum age (s),
-- $4 interval between fetches (s), $5 batch size.
UPDATE orders o SET checked_at = now()
FROM (
    SELECT id FROM orders
    WHERE closed_at IS NULL
      AND processor = ANY ($1::text[])
      AND created_at <= now() - make_interval(secs => $2)
      AND created_at > now() - make_interval(secs => $3)
      AND (checked_at IS NULL OR checked_at <= now() - make_interval(secs => $4))
    ORDER BY coalesce(checked_at, created_at)
    LIMIT $5
    FOR UPDATE SKIP LOCKED
) due
WHERE o.id = due.id
RETURNING o.id, o.processor, o.payment_id
