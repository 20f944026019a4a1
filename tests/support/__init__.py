"""Helpers the tiers share: proxies, the daemon handle and fake engine, replicas, Jupyter."""
