-- Which of a model's routes answered (its index in the catalog, never a name) and how many
-- route attempts the request made; older rows are route 0, 0 attempts.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS route_index UInt16 DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS attempts UInt16 DEFAULT 0
