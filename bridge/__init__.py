"""bridge: a durable event router between Segment and MoEngage."""

__version__ = "0.1.0"
