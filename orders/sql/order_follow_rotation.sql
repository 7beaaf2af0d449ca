-- An order of a key rotated away since it was placed follows the key: a top-up whose
-- payment was being created while the key was rotated was written on the old key after the
-- rotation had moved its orders. Under the order's row lock (order_lock.sql), before it is
-- credited, so the payment lands where the balance went. $1 order id. No row: not moved.
UPDATE orders o SET key_id = kp.key_id
FROM key_predecessors kp
WHERE o.id = $1 AND kp.predecessor_id = o.key_id
RETURNING o.key_id
