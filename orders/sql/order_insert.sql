-- A new order. $2, the key topped up (NULL: a new key), is taken as the key it was rotated
-- to if a rotation moved it while the payment was being created (order_follow_rotation.sql
-- catches the rest, at crediting).
INSERT INTO orders (
    id, key_id, amount_usd, processor, pay_currency, payment_id, invoice_id,
    pay_address, pay_amount, pay_extra_id, payment_url, expires_at, status
) VALUES (
    $1, coalesce((SELECT kp.key_id FROM key_predecessors kp WHERE kp.predecessor_id = $2), $2),
    $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13
)
RETURNING created_at
