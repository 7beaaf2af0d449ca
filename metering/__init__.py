"""The meter: a durable JetStream pull consumer that writes usage events to ClickHouse and
debits balances in Postgres, each event exactly once. `event.py` is the one definition of the
usage event (fields, serialisation, validation, ClickHouse row); the ledger reconciler and
the ClickHouse store with its migrations and the rollup repair (`rollups.py`) live here
too. May import `apifast`, never `router` or `admin`."""

if __name__ != "apifast.metering":
    raise ImportError("import this package as apifast.metering")
