"""The OpenAI-compatible router: HTTP endpoints, the model catalog, pricing, reservations
and the usage-event publisher. It may import `apifast` and the provider contract, never a
particular plugin, `metering` internals (beyond the ClickHouse read helpers) or `admin`."""
