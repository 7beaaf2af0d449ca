-- A rotation that gave up (nothing moved) enables its key again, unless someone else changed
-- `disabled` meanwhile (an operator disabled it: `rotating` was cleared). $1 the key id.
UPDATE api_keys SET disabled = false, rotating = false WHERE id = $1 AND rotating
