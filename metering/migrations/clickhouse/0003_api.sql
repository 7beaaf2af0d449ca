-- Which client protocol a request used (chat | messages | responses); older rows are chat.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS api LowCardinality(String) DEFAULT 'chat';
