"""The long-running daemon: the coordinator, the service that owns the initial pull,
auto-sync and shutdown, the aiohttp apps and metrics. Imports engine, s3 and core."""
