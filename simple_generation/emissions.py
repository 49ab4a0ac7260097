"""Energy and carbon emissions of each generation call, measured with codecarbon's offline tracker.

Each call appends one row to ``<emissions_dir>/emissions.csv`` (codecarbon's own format; the project
name is the model). The offline tracker never touches the network: the carbon intensity comes from the
country in ``CODECARBON_COUNTRY_ISO_CODE`` (or codecarbon's ``.codecarbon.config``), USA when unset.
codecarbon is an optional extra (``pip install 'simple-generation[emissions]'``); without it, calls run
untracked after one warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger("simple_generation")

DEFAULT_COUNTRY = "USA"
_warned_missing = False


@dataclass
class EmissionsReading:
    """Filled in when the tracked block ends (None when not tracked)."""

    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None
    csv_path: str | None = None


def _country_configured() -> bool:
    if os.environ.get("CODECARBON_COUNTRY_ISO_CODE"):
        return True
    try:
        from codecarbon.core.config import get_hierarchical_config

        return bool(get_hierarchical_config().get("country_iso_code"))
    except Exception:  # noqa: BLE001 - an unreadable config file just means "not configured"
        return False


def _make_tracker(output_dir: str, project_name: str):
    from codecarbon import OfflineEmissionsTracker

    # codecarbon logs at INFO by default, and once before its own log_level applies: quiet it first.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    kwargs: dict = {} if _country_configured() else {"country_iso_code": DEFAULT_COUNTRY}
    try:  # codecarbon >= 3.2 names outputs this way; older versions only know save_to_file
        from codecarbon.output_methods.base_output import OutputMethod

        kwargs["output_methods"] = [OutputMethod.CSV]
    except ImportError:
        kwargs["save_to_file"] = True
    return OfflineEmissionsTracker(
        output_dir=output_dir, output_file="emissions.csv", project_name=project_name, log_level="error", **kwargs,
    )


@contextlib.contextmanager
def track_emissions(enabled: bool, output_dir: str, project_name: str) -> Iterator[EmissionsReading]:
    """Track the block's energy use; yield an :class:`EmissionsReading` filled in when it ends.

    Example:
        >>> with track_emissions(True, ".", "my-model") as reading:     # doctest: +SKIP
        ...     run_generation()
        >>> reading.energy_kwh                                          # doctest: +SKIP
    """
    global _warned_missing
    reading = EmissionsReading()
    if not enabled:
        yield reading
        return
    if importlib.util.find_spec("codecarbon") is None:
        if not _warned_missing:
            _warned_missing = True
            logger.warning("codecarbon is not installed, so emissions.csv is not written: "
                           "pip install 'simple-generation[emissions]' (or pass track_emissions=False).")
        yield reading
        return
    os.makedirs(output_dir, exist_ok=True)
    tracker = _make_tracker(output_dir, project_name)
    tracker.start()
    try:
        yield reading
    finally:
        # Also on failure: the energy spent is real, and the tracker's thread must stop.
        try:
            tracker.stop()
            data = tracker.final_emissions_data
            if data is not None:
                reading.energy_kwh = float(data.energy_consumed)
                reading.emissions_kg_co2eq = float(data.emissions)
                reading.csv_path = os.path.join(output_dir, "emissions.csv")
        except Exception as err:  # noqa: BLE001 - measuring must never lose the answers
            logger.warning("Could not record emissions: %s", err)
