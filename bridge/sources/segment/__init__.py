"""Segment Tracking API (/v1/*) and Segment Webhooks destination (/segment/webhook)."""
