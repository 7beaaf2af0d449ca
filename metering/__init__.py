"""The meter: a durable JetStream pull consumer that writes usage events to ClickHouse and
debits balances in Postgres, each event exactly once. Also the ClickHouse read helpers the
router's usage endpoints use. May import `apifast`, never `router` or `admin`."""
