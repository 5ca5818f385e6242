"""The coordinator's web dashboard: a static page, and one JSON endpoint it polls.

``GET /dashboard`` serves the page, its script and its style sheet, all
from the package (no CDN: it works on a fleet's offline network). They
hold no data: the page asks for the admin token once, keeps it in the
browser tab's ``sessionStorage``, and polls ``GET /v1/admin/dashboard`` every
two seconds with it as a bearer token. That endpoint is behind the admin
credential like every admin endpoint (open only in ``--insecure`` mode,
where no credential exists).

The JSON holds the fleet (every device with its last check-in, version,
policy verdict and readings), the rounds (state, duration, accuracy and
loss, the phases when recorded), the privacy budget, and recent events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

if TYPE_CHECKING:
    from fedge.coordinator.service import Coordinator
    from fedge.store import DeviceRow

__all__ = ["add_dashboard_routes", "dashboard_data"]

_ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Profile fields the fleet table shows; the rest stay in the JSON.
_READINGS = ("cpu_load", "memory_available_mb", "battery_percent", "on_ac", "temperature_c", "disk_free_mb",
             "agent_rss_mb", "examples_per_s", "arch", "cores")


def _asset(name: str) -> bytes:
    return resources.files("fedge.coordinator").joinpath("static", name).read_bytes()


class _RoundsCache:
    """The rounds' JSON and the device rows, read again only when the store's change
    markers move (most polls find nothing new: a round ends every few seconds at most)."""

    def __init__(self) -> None:
        self.version: tuple[int, float, int] | None = None
        self.text = "[]"
        self.devices_version: tuple[int, float, float, float] | None = None
        self.devices: list[DeviceRow] = []

    def get(self, coordinator: Coordinator) -> str:
        version = coordinator.store.rounds_version()
        if version != self.version:
            self.text = json.dumps(coordinator.history())
            self.version = version
        return self.text

    def device_rows(self, coordinator: Coordinator) -> list[DeviceRow]:
        version = coordinator.store.devices_version()
        if version != self.devices_version:
            self.devices = coordinator.store.devices()
            self.devices_version = version
        return self.devices


def dashboard_data(coordinator: Coordinator, *, events: int = 50) -> dict[str, Any]:
    """Everything the dashboard shows, as one JSON-ready mapping."""
    data: dict[str, Any] = json.loads(_dashboard_json(coordinator, _RoundsCache(), events=events))
    return data


def _dashboard_json(coordinator: Coordinator, rounds: _RoundsCache, *, events: int) -> str:
    now = coordinator.clock()
    online = set(coordinator.online(now))
    eligible = set(coordinator.available(now))
    fleet = []
    for d in rounds.device_rows(coordinator):
        profile = d.profile
        fleet.append({
            "device": d.device_id,
            "last_seen": d.last_seen or None,
            "online": d.device_id in online,
            "eligible": d.device_id in eligible,
            "revoked": d.revoked_at is not None,
            "version": profile.get("fedge_version"),
            "policy": profile.get("policy"),
            "examples": d.num_examples,
            "readings": {k: profile[k] for k in _READINGS if k in profile},
        })
    status = coordinator.status(history=False)
    head = {
        "now": now,
        "generated_at": time.time(),
        "state": status["state"],
        "rounds_complete": status["rounds_complete"],
        "rounds_target": status["rounds"],
        "open": status["open"],
        "fleet": fleet,
        "privacy": status["privacy"],
        "refusals": status["refusals"],
        "events": [e.to_json() for e in coordinator.store.events(limit=events)],
    }
    # The rounds are spliced in as text: cached, not serialized again on every poll.
    return json.dumps(head)[:-1] + ', "rounds": ' + rounds.get(coordinator) + "}"


def add_dashboard_routes(app: FastAPI, coordinator: Coordinator, admin: Callable[[Request], None]) -> None:
    """``/dashboard`` (the page and its assets) and ``/v1/admin/dashboard`` (its data)."""

    @app.get("/dashboard", include_in_schema=False)
    async def page() -> Response:
        return Response(_asset("dashboard.html"), media_type=_ASSETS["dashboard.html"],
                        headers=_NO_STORE)

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _ASSETS or name == "dashboard.html":
            return Response(b'{"error": "not_found", "detail": "no such dashboard file"}', status_code=404,
                            media_type="application/json")
        return Response(_asset(name), media_type=_ASSETS[name], headers=_NO_STORE)

    rounds = _RoundsCache()

    @app.get("/v1/admin/dashboard")
    async def data(request: Request, events: int = 50) -> Response:
        """Admin: the fleet, the rounds, the privacy budget and recent events, for the dashboard."""
        admin(request)
        body = _dashboard_json(coordinator, rounds, events=max(0, min(events, 500)))
        return Response(body, media_type="application/json")


# The page and its script change with fedge's version; a stale cached copy would
# show the old one after an upgrade.
_NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff",
             "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'"}
