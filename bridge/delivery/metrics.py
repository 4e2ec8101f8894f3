"""What delivery reports. The app plugs Prometheus in; tests may plug nothing."""

from __future__ import annotations


class DeliveryMetrics:
    def delivered(self, destination: str, n: int) -> None:
        pass

    def dead_lettered(self, destination: str, reason: str, n: int) -> None:
        pass

    def discarded(self, source: str, destination: str, reason: str, n: int) -> None:
        pass

    def request(self, destination: str, status: int, seconds: float) -> None:
        pass

    def paused(self, destination: str, paused: bool) -> None:
        pass


NoDeliveryMetrics = DeliveryMetrics
