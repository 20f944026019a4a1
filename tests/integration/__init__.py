"""In-process tests against real servers (moto, rclone, SeaweedFS) and scripted loopback ones."""
