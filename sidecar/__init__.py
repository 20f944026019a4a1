"""netvol-sidecar: keep a local folder and an S3 prefix in sync, content-addressed."""

__version__ = "0.1.0"
