"""Carbon-emission tracking around a generation call (codecarbon, offline). Stub: filled in by issue 4."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class EmissionsReading:
    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None


@contextlib.contextmanager
def track_emissions(enabled: bool, output_dir: str, project_name: str):
    """Yield an :class:`EmissionsReading` filled in when the block ends."""
    reading = EmissionsReading()
    yield reading
