-- Rotation's lineage (orders/rotate_api.py): the keys a key was rotated from, so that its
-- holder keeps the history stored under their hashes (ClickHouse rows are keyed by the hash
-- of the key that made the request, and receipts name it). Each key lists all of its
-- predecessors, not just the last: one indexed read gives the whole chain. A rotation gives
-- the new key the old key's list plus the old key, and empties the old key's list.
CREATE TABLE IF NOT EXISTS key_predecessors (
    key_id          bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    predecessor_id  bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    PRIMARY KEY (key_id, predecessor_id)
);
-- "Was this key rotated away?": the history endpoints refuse such a key (401).
CREATE INDEX IF NOT EXISTS key_predecessors_predecessor ON key_predecessors (predecessor_id);
