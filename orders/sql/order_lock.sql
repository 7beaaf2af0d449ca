-- Every change to an order and its payments runs under this row lock, so concurrent
-- deliveries of the same webhook are applied one after the other.
SELECT id, key_id, amount_usd, status, credited_usd, closed_at
FROM orders WHERE id = $1 AND processor = $2
FOR UPDATE
