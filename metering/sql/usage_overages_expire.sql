-- Order and ledger retention: the overage records of requests before $1 (per request, with
-- their key) go with the ledger rows of those requests.
DELETE FROM usage_overages WHERE created_at < $1
