SELECT order_id, status, credited_usd, parent_payment_id
FROM payments WHERE processor = $1 AND payment_id = $2
FOR UPDATE
