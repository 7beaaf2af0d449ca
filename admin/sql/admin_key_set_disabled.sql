-- The operator's word is final: it also ends a rotation's claim, so a rotation that gives up
-- cannot undo this (migration 0025).
UPDATE api_keys SET disabled = $2, rotating = false WHERE id = $1 RETURNING id
