-- The latest checkpoint of each stream still running: what it had delivered (counts, cost,
-- model, timestamps; never content), as published. Deleted when the request's final event
-- is debited; billed instead of it when the router died and the hold expired.
CREATE TABLE IF NOT EXISTS stream_checkpoints (
    generation_id  text PRIMARY KEY,
    checkpoint     integer NOT NULL,
    event          jsonb NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
