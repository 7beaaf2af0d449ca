-- The order a processor payment belongs to: one already seen, or the order created with it.
SELECT order_id FROM payments WHERE processor = $1 AND payment_id = $2
UNION ALL
SELECT id FROM orders WHERE processor = $1 AND payment_id = $2
LIMIT 1
