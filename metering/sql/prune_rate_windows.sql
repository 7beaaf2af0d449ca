-- Rate windows older than the previous minute limit nothing any more.
DELETE FROM key_rate_windows WHERE minute < floor(extract(epoch FROM now()) / 60) - 1
