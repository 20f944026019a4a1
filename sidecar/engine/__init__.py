"""The sync engine: scan, state (BASE), transfers and the orchestration that carries out
the core's decisions. Imports sidecar.s3 and sidecar.core only."""
