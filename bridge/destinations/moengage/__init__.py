"""MoEngage Data API destination (kind ``moengage``)."""

from bridge.destinations.moengage.destination import MoEngageDestination

__all__ = ["MoEngageDestination"]
