"""ReplicaBoard: where engine replicas post their state, for the ingresses to read.

Ray Serve routes a handle's call to one replica; nothing public addresses all of them. So each
replica reports here twice a second (load, what it served, its engine metrics), and each
ingress reads one snapshot twice a second for GET /replicas, /metrics, readiness and
admission. A replica that stops reporting (killed) leaves the board after STALE_AFTER_S.
"""

from __future__ import annotations

import time

STALE_AFTER_S = 3.0


class ReplicaBoard:
    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, stats: dict) -> None:
        self.reports[stats["id"]] = (time.monotonic(), stats)

    def snapshot(self) -> list[dict]:
        """The live replicas' latest reports, oldest replica first."""
        now = time.monotonic()
        self.reports = {name: entry for name, entry in self.reports.items() if now - entry[0] < STALE_AFTER_S}
        return [stats for _, stats in self.reports.values()]
