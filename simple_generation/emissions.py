"""Energy and carbon emissions of each generation call, measured with codecarbon's offline tracker.

Each call appends one row to ``<emissions_dir>/emissions.csv`` (codecarbon's own format; the project
name is the model). Three promises, see ``docs/emissions.md``:

* **Never touch a file we did not write.** When ``emissions.csv`` exists with other columns than
  codecarbon's (which codecarbon would rename to ``.bak`` and replace), rows go to
  ``emissions-simple-generation.csv`` instead (one warning); when that file is foreign too, the call
  fails with a ``ValueError`` naming it, before any generation. A file that cannot be written is
  reported with its path and the OS error; the answers and the energy reading are kept.
* **Offline means offline.** The carbon intensity comes from the country in
  ``CODECARBON_COUNTRY_ISO_CODE`` (or codecarbon's ``.codecarbon.config``), USA when unset. Settings
  that would reach the network (an Electricity Maps token, an HTTP ``emissions_endpoint``, API /
  Prometheus / Logfire outputs) are overridden, wherever they come from.
* **Hardware detection once per process.** codecarbon probes the hardware (``lscpu``, py-cpuinfo's
  second Python, ``nvidia-smi``...) on the first tracked call; later calls reuse what it found.

codecarbon is an optional extra (``pip install -e '.[emissions]'`` in a clone of simple-generation); without it,
calls run untracked after one warning.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger("simple_generation")

DEFAULT_COUNTRY = "USA"
CSV_NAME = "emissions.csv"
FALLBACK_CSV_NAME = "emissions-simple-generation.csv"
_warned_missing = False
_warned_fallback: set[str] = set()

# codecarbon's per-tracker system metadata (os, python version, cpu counts: ``lscpu`` on Linux),
# collected by the first tracker of the process and reused by the next ones.
_system_metadata: dict = {}
_system_metadata_lock = threading.Lock()


@dataclass
class EmissionsReading:
    """Filled in when the tracked block ends (None when not tracked)."""

    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None
    csv_path: str | None = None


def codecarbon_columns() -> list[str]:
    """The header codecarbon writes in its CSV file: the fields of its ``EmissionsData``, in order."""
    from codecarbon.output_methods.emissions_data import EmissionsData

    return [field.name for field in dataclasses.fields(EmissionsData)]


def _csv_state(path: str) -> str:
    """``"missing"``, ``"ours"`` (empty, or exactly codecarbon's header: it appends) or ``"foreign"``.

    Exactly: codecarbon writes its columns in ``EmissionsData`` order, so another order means another
    writer (and codecarbon < 3.3, comparing in order, would rename such a file to ``.bak``).
    """
    if not os.path.lexists(path):
        return "missing"
    if not os.path.isfile(path):
        return "foreign"
    try:
        if os.path.getsize(path) == 0:
            return "ours"  # nothing in it to lose; codecarbon writes its header
        # Read the header as codecarbon's FileOutput does: the first csv row.
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return "foreign"  # cannot tell it is ours: leave it alone
    return "ours" if header == codecarbon_columns() else "foreign"


def emissions_csv_path(output_dir: str) -> str:
    """The file this process's rows go to in ``output_dir``: ``emissions.csv`` unless it is not ours.

    Raises:
        ValueError: both ``emissions.csv`` and ``emissions-simple-generation.csv`` exist and neither
            has codecarbon's header.
    """
    primary = os.path.join(output_dir, CSV_NAME)
    if _csv_state(primary) != "foreign":
        return primary
    fallback = os.path.join(output_dir, FALLBACK_CSV_NAME)
    if _csv_state(fallback) == "foreign":
        raise ValueError(
            f"Cannot record emissions: {fallback} exists and is not a codecarbon emissions file (its first "
            f"line is not codecarbon's header), and neither is {primary}. simple-generation never "
            "overwrites files it did not write: move one of them, choose another emissions_dir "
            "(--emissions-dir), or turn tracking off (track_emissions=False, --no-emissions)."
        )
    if primary not in _warned_fallback:
        _warned_fallback.add(primary)
        logger.warning("%s is not a codecarbon emissions file (its header is not codecarbon's), so it is "
                       "left untouched: "
                       "emissions are written to %s instead.", primary, fallback)
    return fallback


def _country_configured() -> bool:
    if os.environ.get("CODECARBON_COUNTRY_ISO_CODE"):
        return True
    try:
        from codecarbon.core.config import get_hierarchical_config

        return bool(get_hierarchical_config().get("country_iso_code"))
    except Exception:  # noqa: BLE001 - an unreadable config file just means "not configured"
        return False


@functools.lru_cache(maxsize=1)
def _tracker_class():
    from codecarbon import OfflineEmissionsTracker

    class Tracker(OfflineEmissionsTracker):
        """codecarbon's offline tracker that caches system metadata and never raises from a write."""

        sg_csv_path: str | None = None
        sg_write_error: object = None

        def _populate_system_metadata(self) -> None:
            # codecarbon runs `lscpu` (and `scontrol` under SLURM) here for *every* tracker, although
            # its hardware cache already spares the rest of the detection after the first one.
            with _system_metadata_lock:
                if _system_metadata:
                    self._conf.update(_system_metadata)
                    return
                before = dict(self._conf)
                super()._populate_system_metadata()
                _system_metadata.update(
                    {key: value for key, value in self._conf.items() if key not in before or before[key] != value})

        def _persist_data(self, *args, **kwargs) -> None:
            # codecarbon's stop() swallows every exception (and then has no final_emissions_data), so
            # keep the write error for our own message, and let stop() finish its measurement.
            if self.sg_csv_path and _csv_state(self.sg_csv_path) == "foreign":
                self.sg_write_error = ("the file changed during the call and is no longer a codecarbon "
                                       "emissions file, so it was left untouched")
                return
            try:
                super()._persist_data(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - reported by track_emissions with the file name
                self.sg_write_error = err

    return Tracker


def _offline_kwargs(parameters) -> dict:
    """Explicit values for every setting that could make codecarbon reach the network.

    Anything not passed is read from ``.codecarbon.config`` (working and home directory) and
    ``CODECARBON_*`` variables: an ``electricitymaps_api_token`` there makes even the offline tracker
    query api.electricitymaps.com; ``emissions_endpoint`` adds an HTTP POST; ``output_methods``
    (``api``, ``prometheus``, ``logfire``) add more.
    """
    kwargs: dict = {"emissions_endpoint": "", "output_handlers": []}
    # An empty token is "no token": codecarbon then uses its own offline data, and (being set) also
    # hides the deprecated co2_signal_api_token from the config. Older versions only know that name.
    token = "electricitymaps_api_token" if "electricitymaps_api_token" in parameters else "co2_signal_api_token"
    kwargs[token] = ""
    if "output_methods" in parameters:  # codecarbon >= 3.2
        from codecarbon.output_methods.base_output import OutputMethod

        kwargs["output_methods"] = [OutputMethod.CSV]
    else:
        kwargs.update(save_to_file=True, save_to_api=False, save_to_logger=False, save_to_prometheus=False,
                      save_to_logfire=False)
    if "allow_multiple_runs" in parameters:  # no lock file shared with other codecarbon users
        kwargs["allow_multiple_runs"] = True
    return {key: value for key, value in kwargs.items() if key in parameters}


def _make_tracker(csv_path: str, project_name: str):
    from codecarbon.emissions_tracker import BaseEmissionsTracker

    # codecarbon logs at INFO by default, and once before its own log_level applies: quiet it first.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    parameters = inspect.signature(BaseEmissionsTracker.__init__).parameters
    kwargs = _offline_kwargs(parameters)
    if not _country_configured():
        kwargs["country_iso_code"] = DEFAULT_COUNTRY
    tracker = _tracker_class()(
        output_dir=os.path.dirname(csv_path) or ".", output_file=os.path.basename(csv_path),
        project_name=project_name, log_level="error", **kwargs,
    )
    tracker.sg_csv_path = csv_path
    return tracker


def _halt(tracker) -> None:
    """Stop the tracker's measuring threads after a failed stop()."""
    for name in ("_scheduler", "_scheduler_monitor_power"):
        with contextlib.suppress(Exception):
            scheduler = getattr(tracker, name, None)
            if scheduler is not None:
                scheduler.stop()


def _stop(tracker, csv_path: str, reading: EmissionsReading) -> None:
    # codecarbon's stop() is wrapped in a suppress-every-exception decorator; call the function it wraps
    # so a failure is reported with its real cause instead of a missing final_emissions_data.
    stop = getattr(type(tracker).stop, "__wrapped__", None)
    try:
        if stop is not None:
            stop(tracker)
        else:
            tracker.stop()
    except Exception as err:  # noqa: BLE001 - measuring must never lose the answers
        _halt(tracker)
        logger.warning("Could not record the emissions of this call in %s: %s: %s",
                       csv_path, type(err).__name__, err)
        return
    data = getattr(tracker, "final_emissions_data", None)
    if data is None:
        logger.warning("Could not record the emissions of this call in %s: codecarbon measured nothing.", csv_path)
        return
    reading.energy_kwh = float(data.energy_consumed)
    reading.emissions_kg_co2eq = float(data.emissions)
    if tracker.sg_write_error is not None:
        logger.warning("Could not write emissions to %s: %s. The answers are unaffected; this call's energy "
                       "(%.3g kWh) is still reported.", csv_path, tracker.sg_write_error, reading.energy_kwh)
        return
    reading.csv_path = csv_path


@contextlib.contextmanager
def track_emissions(enabled: bool, output_dir: str, project_name: str) -> Iterator[EmissionsReading]:
    """Track the block's energy use; yield an :class:`EmissionsReading` filled in when it ends.

    Raises:
        ValueError: before the block runs, when neither ``emissions.csv`` nor
            ``emissions-simple-generation.csv`` in ``output_dir`` can be used without overwriting a
            file that is not codecarbon's (see :func:`emissions_csv_path`).

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
                           "pip install -e '.[emissions]' in a clone of simple-generation "
                           "(or pass track_emissions=False).")
        yield reading
        return
    csv_path = emissions_csv_path(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        tracker = _make_tracker(csv_path, project_name)
        tracker.start()
    except Exception as err:  # noqa: BLE001 - measuring must never stop the generation
        logger.warning("Emissions of this call are not tracked (%s): %s: %s", csv_path, type(err).__name__, err)
        yield reading
        return
    try:
        yield reading
    finally:
        # Also on failure: the energy spent is real, and the tracker's thread must stop.
        _stop(tracker, csv_path, reading)
