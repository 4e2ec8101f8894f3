"""Delivery: per-destination workers that lease, map, send and settle jobs."""
