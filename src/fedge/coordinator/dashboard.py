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

import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

if TYPE_CHECKING:
    from fedge.coordinator.service import Coordinator

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


def dashboard_data(coordinator: Coordinator, *, events: int = 50) -> dict[str, Any]:
    """Everything the dashboard shows, as one JSON-ready mapping."""
    now = coordinator.clock()
    online = set(coordinator.online(now))
    eligible = set(coordinator.available(now))
    fleet = []
    for d in coordinator.store.devices():
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
    status = coordinator.status()
    return {
        "now": now,
        "generated_at": time.time(),
        "state": status["state"],
        "rounds_complete": status["rounds_complete"],
        "rounds_target": status["rounds"],
        "open": status["open"],
        "fleet": fleet,
        "rounds": status["history"],
        "privacy": status["privacy"],
        "refusals": status["refusals"],
        "events": [e.to_json() for e in coordinator.store.events(limit=events)],
    }


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

    @app.get("/v1/admin/dashboard")
    async def data(request: Request, events: int = 50) -> dict[str, Any]:
        """Admin: the fleet, the rounds, the privacy budget and recent events, for the dashboard."""
        admin(request)
        return dashboard_data(coordinator, events=max(0, min(events, 500)))


# The page and its script change with fedge's version; a stale cached copy would
# show the old one after an upgrade.
_NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff",
             "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'"}
