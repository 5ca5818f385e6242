"""A lab's state file: the record of every host resource the lab has made.

``LAB_ROOT/<lab>/state.json`` lists each resource by kind (:data:`KINDS` gives
the fields of each) with a serial number. :class:`~fedge.lab.host.Host`
records a resource here *before* it makes it and drops it only once it is
gone, and every change rewrites the whole file atomically; so whenever the lab
dies, the file lists everything it may have left, and
:func:`~fedge.lab.host.teardown` removes exactly that. A file that is not a
fedge lab's, of another version, or with a resource of an unknown kind or
with the wrong fields is refused rather than guessed at.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import ConfigError, FedgeError
from fedge.store import atomic_write

__all__ = ["KINDS", "LAB_ROOT", "FieldValue", "LabError", "LabState", "Resource", "lab_dir", "state_path",
           "validate_lab_name"]


class LabError(FedgeError):
    """A lab host operation failed: a command, the state file, or a resource that is not the lab's."""


#: Where labs keep their state file (``LAB_ROOT/<lab>/state.json``) and device state dirs.
LAB_ROOT = Path("/run/fedge-lab")
#: Field names and types of each kind of resource in the state file.
KINDS: Mapping[str, Mapping[str, tuple[type, ...]]] = {
    "bridge": {"name": (str,), "address": (str,)},
    "netns": {"name": (str,)},
    "veth": {"host_end": (str,), "device_end": (str,), "netns": (str,), "address": (str,)},
    "qdisc": {"dev": (str,), "netns": (str, type(None))},
    "iptables": {"netns": (str,), "chain": (str,), "probability": (str,)},
    "mount": {"path": (str,)},
    "container": {"name": (str,)},
    "process": {"pid": (int,), "start_time": (int,)},
    "file": {"path": (str,)},
}
FieldValue = str | int | None
_FORMAT = "fedge-lab-state"
_VERSION = 1
_LAB_NAME = re.compile(r"[a-z0-9]{1,6}")


def validate_lab_name(name: str) -> str:
    """Return ``name`` if it can name a lab (``[a-z0-9]{1,6}``: ``fl<name><iii>h`` fits 15 chars)."""
    if not isinstance(name, str) or not _LAB_NAME.fullmatch(name):
        raise ConfigError(f"lab name {name!r} must be 1 to 6 characters from a-z and 0-9")
    return name


def lab_dir(lab: str, *, root: Path = LAB_ROOT) -> Path:
    """The folder of the lab's state file and device state dirs."""
    return root / validate_lab_name(lab)


def state_path(lab: str, *, root: Path = LAB_ROOT) -> Path:
    """The lab's state file, ``<root>/<lab>/state.json``."""
    return lab_dir(lab, root=root) / "state.json"


@dataclass(frozen=True)
class Resource:
    """One recorded resource: its kind, its serial number in the state file, and its fields."""

    kind: str
    id: int
    fields: Mapping[str, FieldValue]

    def text(self, key: str) -> str:
        value = self.fields[key]
        if not isinstance(value, str):
            raise LabError(f"{self.kind} resource {self.id}: field {key!r} is {value!r}, not text")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.fields.get(key)
        return None if value is None else self.text(key)

    def integer(self, key: str) -> int:
        value = self.fields[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise LabError(f"{self.kind} resource {self.id}: field {key!r} is {value!r}, not an integer")
        return value

    def describe(self) -> str:
        """A short human name, e.g. ``veth flci000h/flci000d`` or ``process 4242``."""
        return f"{self.kind} " + "/".join(str(v) for k, v in self.fields.items() if k != "start_time" and v)

    def to_json(self) -> dict[str, FieldValue]:
        return {"kind": self.kind, "id": self.id, **self.fields}


def _resource(kind: object, rid: object, fields: Mapping[str, object]) -> Resource:
    if not isinstance(kind, str) or kind not in KINDS:
        raise LabError(f"unknown resource kind {kind!r}; known: {', '.join(KINDS)}")
    if isinstance(rid, bool) or not isinstance(rid, int) or rid < 1:
        raise LabError(f"{kind} resource id {rid!r} must be a positive integer")
    want = KINDS[kind]
    if set(fields) != set(want):
        raise LabError(f"{kind} resource needs fields {', '.join(want)}; got {', '.join(fields) or 'none'}")
    clean: dict[str, FieldValue] = {}
    for key, types in want.items():
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, types) \
                or not isinstance(value, (str, int, type(None))):
            raise LabError(f"{kind} resource field {key!r} has the wrong type: {value!r}")
        clean[key] = value
    return Resource(kind, rid, clean)


class LabState:
    """A lab's state file: ``{"format", "version", "lab", "created", "next_id", "resources"}``.

    Every change rewrites the whole file atomically (temporary file, fsync, rename), so a reader or
    a teardown after a crash sees the list before the change or after it, never a torn one.
    """

    def __init__(self, path: Path, *, lab: str, created: float, resources: Sequence[Resource] = (),
                 next_id: int = 1) -> None:
        self.path = path
        self.lab = validate_lab_name(lab)
        self.created = created
        self._resources = list(resources)
        self._next_id = max([next_id, *(r.id + 1 for r in self._resources)])

    @classmethod
    def create(cls, path: Path, *, lab: str, created: float | None = None) -> LabState:
        """Start the state file of a new lab; refuses if one is already there (a lab is up or crashed)."""
        validate_lab_name(lab)
        if path.exists():
            raise LabError(f"a lab state file already exists at {path}; run `fedge lab down` first")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = cls(path, lab=lab, created=time.time() if created is None else created)
        state._write()
        return state

    @classmethod
    def load(cls, path: Path) -> LabState:
        """Read a state file; refuses one that is unreadable, corrupt, or not a fedge lab's."""
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise LabError(f"no lab state file at {path}") from None
        except (OSError, ValueError) as e:
            raise LabError(f"{path} is not a readable fedge lab state file: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            raise LabError(f"{path} is not a fedge lab state file (no \"format\": \"{_FORMAT}\")")
        if raw.get("version") != _VERSION:
            raise LabError(f"{path}: lab state version {raw.get('version')!r} is not {_VERSION}")
        lab, created, items = raw.get("lab"), raw.get("created"), raw.get("resources")
        if not isinstance(lab, str) or not _LAB_NAME.fullmatch(lab):
            raise LabError(f"{path}: lab name {lab!r} is not a valid lab name")
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not isinstance(items, list):
            raise LabError(f"{path}: \"created\" must be a number and \"resources\" a list")
        resources = []
        for item in items:
            if not isinstance(item, dict):
                raise LabError(f"{path}: resource {item!r} is not an object")
            fields = {k: v for k, v in item.items() if k not in ("kind", "id")}
            try:
                resources.append(_resource(item.get("kind"), item.get("id"), fields))
            except LabError as e:
                raise LabError(f"{path}: {e}") from None
        next_id = raw.get("next_id", 1)
        return cls(path, lab=lab, created=float(created), resources=resources,
                   next_id=next_id if isinstance(next_id, int) else 1)

    def resources(self) -> list[Resource]:
        """The recorded resources, oldest first."""
        return list(self._resources)

    def find(self, kind: str, **match: FieldValue) -> list[Resource]:
        """The recorded resources of ``kind`` whose fields equal ``match``."""
        return [r for r in self._resources
                if r.kind == kind and all(r.fields.get(k) == v for k, v in match.items())]

    def add(self, kind: str, **fields: FieldValue) -> Resource:
        """Record a resource (and write the file) *before* the caller makes it."""
        resource = _resource(kind, self._next_id, fields)
        self._next_id += 1
        self._resources.append(resource)
        self._write()
        return resource

    def discard(self, resource: Resource) -> None:
        """Drop a resource that is gone; an unknown one is an error (the caller lost track)."""
        kept = [r for r in self._resources if r.id != resource.id]
        if len(kept) == len(self._resources):
            raise LabError(f"{resource.describe()} (id {resource.id}) is not recorded in {self.path}")
        self._resources = kept
        self._write()

    def delete(self) -> None:
        """Remove the state file (teardown, once nothing is left)."""
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        data = {"format": _FORMAT, "version": _VERSION, "lab": self.lab, "created": self.created,
                "next_id": self._next_id, "resources": [r.to_json() for r in self._resources]}
        atomic_write(self.path, json.dumps(data, indent=1).encode() + b"\n")
