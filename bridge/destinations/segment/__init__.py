"""Segment Tracking API destination (kind ``segment``)."""

from bridge.destinations.segment.destination import SegmentDestination

__all__ = ["SegmentDestination"]
