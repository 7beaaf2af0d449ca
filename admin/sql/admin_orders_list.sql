-- $1 status (NULL: any), $2 and $3 the creation-time range, $4 the row limit.
SELECT o.id, o.key_id, k.prefix, o.amount_usd, o.credited_usd, o.processor, o.pay_currency,
       o.status, o.payment_id, o.invoice_id, o.created_at, o.updated_at, o.closed_at
FROM orders o JOIN api_keys k ON k.id = o.key_id
WHERE ($1::text IS NULL OR o.status = $1) AND o.created_at >= $2 AND o.created_at < $3
ORDER BY o.created_at DESC
LIMIT $4
