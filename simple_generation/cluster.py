"""Generation over a Ray cluster: a generator whose replicas are Ray actors, resumable through the store.

:class:`RayGenerator` is a generator like :class:`~simple_generation.SimpleGenerator` (its ``stream``
takes the same arguments and yields the same :class:`GenerationResult` objects), whose work runs on
``replicas`` Ray actors, each holding ONE ``SimpleGenerator`` (loaded once, in the actor's constructor).
A call's prompts are cut into chunks (identical prompts stay in one chunk, so deduplication and the
numbering of sampled copies are those of a local call), and each chunk goes to a free replica. Ray
restarts a replica that dies (``max_restarts=-1``) and retries the chunk it held (``max_task_retries=-1``).

Resuming is the store's, as everywhere else: replicas look answers up in, and commit each answer to, the
same content-keyed SQLite store as a local run (:mod:`simple_generation.store`). The file lives on the
driver's disk, opened by one small actor pinned to the driver's node; replicas hold a
:class:`StoreProxy` to it (``get_many``, ``put``: committed before the replica hands the answer back).
So a rerun after any kill (driver, replica, node) generates only what no committed answer covers, a
store made by a local run serves a Ray run of the same model and parameters (and back), and the output
is written by the driver alone (the job layer's ordered writer): nothing is written twice.

:class:`RayDataSource` reads inputs only Ray reads (folders, globs, ``s3://``...) with Ray Data, in
input order; :func:`generate_dataset` is a whole job (input, model, output) on a cluster.

Needs the ``ray`` extra: ``pip install -e ".[ray]"`` in a clone.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import GenerationResult, RunSummary

logger = logging.getLogger("simple_generation")

MAX_FAILURES_LISTED = 20


# ---------------------------------------------------------------------------------------------- summaries
@dataclass
class RayRunSummary(RunSummary):
    """``RayGenerator.last_run``: the replicas' :class:`RunSummary` numbers summed over the call's chunks,
    the wall time the driver's, and ``per_replica`` (``"actor@node"`` -> prompts, tokens, energy)."""

    replicas: int = 0
    chunks: int = 0
    per_replica: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class ClusterRunSummary:
    """What ``generate_dataset`` did. ``generated`` counts records answered by this call (generated now or
    failed now); ``already_done`` those whose answer came from the store: held before the run, or committed
    by a replica that died before handing its chunk back (the retried chunk reads them instead of
    generating them again)."""

    output: str
    records: int = 0
    already_done: int = 0
    generated: int = 0
    errors: int = 0
    generated_tokens: int = 0
    wall_time_s: float = 0.0
    energy_kwh: float | None = None
    emissions_kg_co2eq: float | None = None
    store: str | None = None
    per_replica: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    """``(index, source, error)`` of the first records that failed (``errors`` counts them all)."""

    @property
    def prompts_per_second(self) -> float:
        return self.generated / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------- the store
class _StoreServer:
    """A Ray actor on the driver's node holding the run's :class:`ResultStore` (one SQLite connection;
    a sync actor runs one call at a time, so SQLite sees one writer here)."""

    def __init__(self, path: str):
        from .store import ResultStore

        self.store = ResultStore(path)

    def get_many(self, keys: Sequence[str]):
        return self.store.get_many(keys)

    def put_many(self, rows) -> None:
        self.store.put_many(rows)

    def count(self) -> int:
        return self.store.count()

    def close(self) -> None:
        self.store.close()


class StoreProxy:
    """What a replica holds instead of the store: the same ``get_many``/``put`` calls, answered by the
    store actor on the driver's node. ``put`` returns once the answer is committed. ``close`` does nothing
    (the driver owns the store)."""

    def __init__(self, server, path: str):
        self._server = server
        self.path = path

    def get_many(self, keys: Sequence[str]) -> dict:
        import ray

        return ray.get(self._server.get_many.remote(list(keys)))

    def put(self, answer, model: str, prompt: str, params: str) -> None:
        self.put_many([(answer, model, prompt, params)])

    def put_many(self, rows) -> None:
        import ray

        ray.get(self._server.put_many.remote(list(rows)))

    def count(self) -> int:
        import ray

        return ray.get(self._server.count.remote())

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the replica
class _GenerationReplica:
    """A Ray actor: one SimpleGenerator, loaded in ``__init__``, used for every chunk it is handed."""

    def __init__(self, model: str, generator_kwargs: dict[str, Any], track_emissions: bool):
        import ray

        from .generator import SimpleGenerator

        # Each chunk's emissions are measured here (into a private folder) and summed by the driver.
        self._emissions_dir = tempfile.mkdtemp(prefix="sg-emissions-")
        self.gen = SimpleGenerator(model, track_emissions=track_emissions, emissions_dir=self._emissions_dir,
                                   **generator_kwargs)
        context = ray.get_runtime_context()
        self.name = f"{context.get_actor_id()[:12]}@{context.get_node_id()[:8]}"
        # Loaded (said once, above); each chunk's lines ("Store ...: k of n prompts already answered") would
        # reach the driver's terminal once per chunk: the driver reports the call instead.
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "model_identity": self.gen.model_identity,
                "context_length": self.gen.context_length, "engine": self.gen.engine_name}

    def run(self, prompts: list, params: list | None, call: dict[str, Any]) -> dict[str, Any]:
        """Generate a chunk; never raises for the chunk's own errors (they come back as ``error``)."""
        results: list[GenerationResult] = []
        error = None
        if not call.get("plain_prompts"):
            call = {k: v for k, v in call.items() if k != "plain_prompts"}
        try:
            for result in self.gen.stream(prompts, params=params, show_progress_bar=False, **call):
                results.append(result)
        except Exception as err:  # noqa: BLE001 - the driver re-raises it with the call's prompt numbers
            error = {"type": type(err), "message": str(err), "indices": getattr(err, "indices", None),
                     "partial": getattr(err, "partial", None)}
        finally:
            shutil.rmtree(self._emissions_dir, ignore_errors=True)  # the reading is all we keep of its row
            os.makedirs(self._emissions_dir, exist_ok=True)
        return {"results": results, "summary": self.gen.last_run, "replica": self.name, "error": error}


# ---------------------------------------------------------------------------------------------- chunks
def _chunks(prompts: Sequence[Any], params: Sequence[Any] | None, positions: Sequence[int], size: int
            ) -> list[list[int]]:
    """``positions`` cut into chunks of about ``size``, every occurrence of one (prompt, params) in the chunk
    of its first occurrence: copies of a sampled prompt are numbered as in one local call (their seeds and
    store keys depend on it), and identical greedy prompts are generated once."""
    groups: dict[str, list[int]] = {}
    for position in positions:
        key = json.dumps([prompts[position], params[position] if params is not None else None], sort_keys=True,
                         default=repr, ensure_ascii=False)
        groups.setdefault(key, []).append(position)
    chunks: list[list[int]] = []
    current: list[int] = []
    for group in groups.values():
        current += group
        if len(current) >= size:
            chunks.append(sorted(current))
            current = []
    if current:
        chunks.append(sorted(current))
    return chunks


_NUMBERED = re.compile(r"(\btexts\[|\bparams\[|\bprompts? )(\d+)")
_NUMBER_LIST = re.compile(r"(\bprompts )\[([\d, ]*)\]")


def _renumber(message: str, chunk: Sequence[int]) -> str:
    """An error message of a replica, its prompt numbers (positions in the chunk) made positions in the call."""
    def one(match: re.Match) -> str:
        index = int(match.group(2))
        return match.group(1) + str(chunk[index] if index < len(chunk) else index)

    def many(match: re.Match) -> str:
        numbers = [int(n) for n in match.group(2).replace(" ", "").split(",") if n]
        return match.group(1) + str([chunk[n] if n < len(chunk) else n for n in numbers])

    return _NUMBERED.sub(one, _NUMBER_LIST.sub(many, message))


def _ray_failure(err: BaseException) -> RuntimeError:
    """One line naming the failing side's own error, not Ray's wrapping of it."""
    # Ray reports a remote error as text: its remote traceback, then Ray's wrappings. The first
    # "Name: message" line that is not Ray's own is the error.
    lines = re.findall(r"^([A-Za-z_][\w.]*): (.+)$", str(err), flags=re.MULTILINE)
    name, message = next(((n, m) for n, m in lines if not n.startswith("ray.")),
                         (type(err).__name__, (str(err).strip().splitlines() or [""])[0]))
    return RuntimeError(f"the Ray job failed: {name}: {message}")


# ---------------------------------------------------------------------------------------------- local Ray
# Ray ties most processes of a local instance to the driver (they die with it), but not its dashboard and
# runtime-env agents: after a ``kill -9`` of the driver they stay up (about 175 MB) and ignore SIGTERM. This
# watchdog, started with the local instance, remembers the Ray processes the driver started and kills them
# if the driver goes away without saying "done".
_REAPER = textwrap.dedent("""
    import os, select, signal, sys
    import psutil
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the driver is not for us
    driver, since = psutil.Process(int(sys.argv[1])), float(sys.argv[2])
    seen = {}
    while not select.select([sys.stdin], [], [], 0.5)[0]:
        try:
            children = driver.children(recursive=True)
        except psutil.Error:  # the driver is gone
            break
        for proc in children:
            try:
                if (proc.pid not in seen and proc.pid != os.getpid() and proc.create_time() >= since
                        and "ray" in " ".join(proc.cmdline()).lower()):
                    seen[proc.pid] = proc
            except psutil.Error:
                pass
    if sys.stdin.readline():  # "done": the driver stopped Ray itself
        sys.exit(0)
    family = []
    for proc in seen.values():
        try:
            family += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            pass
    for proc in family:
        try:
            proc.kill()  # psutil checks the process is still the one seen (no pid reuse)
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=10)
""")


def _start_reaper() -> subprocess.Popen | None:
    if importlib.util.find_spec("psutil") is None:
        return None
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(time.time() - 1)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop_reaper(reaper: subprocess.Popen | None, clean: bool = True) -> None:
    """``clean``: Ray was shut down (the watchdog just exits); otherwise it kills what Ray left."""
    if reaper is None:
        return
    try:
        if clean:
            reaper.stdin.write(b"done\n")
        reaper.stdin.close()
        reaper.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        reaper.kill()
        reaper.wait()


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError('Running on Ray needs Ray: pip install -e ".[ray]" (in a clone)') from err
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Ray, initialized for the block: the caller's (``ray.init()`` already done), the cluster at
    ``address`` (or ``$RAY_ADDRESS``), else a private local instance started and stopped here (with a
    watchdog that ends its processes should this process be killed)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield
        return
    reaper = None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # "local": a new instance of our own, never some other cluster found on this machine
        reaper = _start_reaper()
        try:
            ray.init(address="local", include_dashboard=False)
        except BaseException:
            _stop_reaper(reaper, clean=False)
            raise
        logger.info("Started a local Ray instance (pass address= to use a cluster).")
    try:
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            _stop_reaper(reaper)


# ---------------------------------------------------------------------------------------------- the generator
class RayGenerator:
    """A generator whose work runs on ``replicas`` Ray actors, each holding one ``SimpleGenerator``.

    Use it as a context manager (it starts or joins Ray and the replicas, and stops what it started);
    ``stream``/``generate``/``__call__`` take the arguments of ``SimpleGenerator``'s and give the same
    answers. A ``store`` (a path on this machine, or a :class:`~simple_generation.store.ResultStore`) is
    shared by every replica through an actor on this node: answers are committed as they finish, and a
    rerun (local or on Ray) reuses them.

    Example:
        >>> from simple_generation.cluster import RayGenerator
        >>> with RayGenerator("gpt2", replicas=2) as gen:                                   # doctest: +SKIP
        ...     answers = gen(["Hello, my name is"] * 4, max_new_tokens=8, temperature=0, store="run.sqlite")

    Args:
        model: hub id or folder, which every node must be able to load.
        replicas: actors, each holding one model (``gpus_per_replica`` GPUs, ``cpus_per_replica`` CPUs).
        address: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); without it, and
            without ``ray.init()`` done by the caller, a local Ray instance is started (and stopped).
        chunk_size: prompts per replica call (default: the call cut into about four chunks per replica,
            at most 256 prompts each).
        show_progress: Ray's own progress output (the call's progress bar is ``show_progress_bar``).
        **generator_kwargs: for each replica's ``SimpleGenerator`` (``system_prompt``, ``lora_weights``,
            ``dtype``, ``track_emissions``, ``emissions_dir``...). Without a GPU per replica and without
            ``device``/``device_map``, replicas run on the CPU.
    """

    def __init__(self, model: str, replicas: int = 2, gpus_per_replica: float = 0, cpus_per_replica: float = 1,
                 address: str | None = None, show_progress: bool = True, chunk_size: int | None = None,
                 **generator_kwargs: Any):
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
        self.model_name_or_path = str(model)
        self.replicas = replicas
        self.gpus_per_replica, self.cpus_per_replica = gpus_per_replica, cpus_per_replica
        self.address, self.show_progress, self.chunk_size = address, show_progress, chunk_size
        kwargs = dict(generator_kwargs)
        self.track_emissions = bool(kwargs.pop("track_emissions", True))
        self.emissions_dir = str(kwargs.pop("emissions_dir", "."))
        if not gpus_per_replica and "device" not in kwargs and "device_map" not in kwargs:
            kwargs["device"] = "cpu"  # no GPU was reserved for the replica: don't take one
        self.generator_kwargs = kwargs
        self.last_run = RayRunSummary()
        self.per_replica: dict[str, dict[str, float]] = {}  # every call of this generator, per replica
        self.model_identity: str | None = None
        self.context_length: int | None = None
        self._session: contextlib.ExitStack | None = None
        self._actors: list = []
        self._names: list[str] = []
        self._stores: dict[str, tuple[Any, StoreProxy]] = {}
        self._emissions_csv: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RayGenerator:
        if self.track_emissions and importlib.util.find_spec("codecarbon") is not None:
            from .emissions import emissions_csv_path

            self._emissions_csv = emissions_csv_path(self.emissions_dir)  # a foreign file fails here, first
        ray = _import_ray()
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(ray_session(self.address))
            stack.callback(self._release)
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = self.show_progress
            replica = ray.remote(num_cpus=self.cpus_per_replica, num_gpus=self.gpus_per_replica or 0,
                                 max_restarts=-1, max_task_retries=-1)(_GenerationReplica)
            self._actors = [replica.remote(self.model_name_or_path, self.generator_kwargs, self.track_emissions)
                            for _ in range(self.replicas)]
            try:  # every replica loaded: a model that cannot load fails here, once
                infos = ray.get([actor.info.remote() for actor in self._actors])
            except ray.exceptions.RayError as err:
                raise _ray_failure(err) from None
        except BaseException:
            stack.close()
            raise
        self._session = stack
        self._names = [info["name"] for info in infos]
        self.model_identity = infos[0]["model_identity"]
        self.context_length = infos[0]["context_length"]
        self.engine_name = infos[0]["engine"]
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the replicas and the store actors (and the local Ray instance, if this started it)."""
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    def _release(self) -> None:
        ray = _import_ray()
        for server, _ in self._stores.values():
            with contextlib.suppress(Exception):
                ray.get(server.close.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(server)
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._stores, self._actors = {}, []

    # ------------------------------------------------------------------ the store
    def _store_proxy(self, store: Any) -> StoreProxy | None:
        """The proxy of the store actor for ``store`` (a path, a ResultStore or a StoreProxy), created once."""
        if store is None or isinstance(store, StoreProxy):
            return store
        from .store import ResultStore

        if isinstance(store, (str, os.PathLike)):
            ResultStore(store).close()  # checked (and created) here, before any work
            path = str(store)
        elif isinstance(store, ResultStore):
            path = store.path
        else:
            raise TypeError(f"store must be a path or a ResultStore, got {type(store).__name__}.")
        path = os.path.abspath(path)
        if path not in self._stores:
            ray = _import_ray()
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            if ray.util.client.ray.is_connected():
                raise ValueError("With a Ray Client address (ray://...) this process is not a node of the cluster, "
                                 "so no actor can open the store on its disk: run the driver on a node of the "
                                 "cluster (address='auto'), or go without a store.")
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            server = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_StoreServer).options(
                scheduling_strategy=here).remote(path)
            self._stores[path] = (server, StoreProxy(server, path))
        return self._stores[path][1]

    # ------------------------------------------------------------------ calls
    def __call__(self, texts, **kwargs: Any) -> list:
        """The answers, in input order (``SimpleGenerator.__call__``'s return)."""
        return [result.answer for result in self.generate(texts, **kwargs)]

    def generate(self, texts, **kwargs: Any) -> list[GenerationResult]:
        """One :class:`GenerationResult` per prompt, in input order; takes the arguments of :meth:`stream`."""
        from .formatting import validate_inputs

        inputs = validate_inputs(texts)
        results: list[GenerationResult | None] = [None] * len(inputs)
        for result in self.stream(inputs, **kwargs):
            results[result.index] = result
        return results  # type: ignore[return-value]

    def stream(self, texts, *, params: Sequence[dict[str, Any] | None] | None = None, store: Any = None,
               on_error: str = "raise", near_duplicates: float | None = None, show_progress_bar: bool = True,
               plain_prompts: bool = False, images: Sequence[Any] | None = None, **call: Any
               ) -> Iterator[GenerationResult]:
        """Generate on the replicas, yielding each chunk's results as it finishes (``index``: the position
        in ``texts``). Arguments as ``SimpleGenerator.stream``'s; ``plain_prompts``: string prompts go to
        the model as they are (no template). ``near_duplicates`` is decided here, on the prompts' text (prompts
        with images are never near-duplicates). ``images`` travel with their prompts' chunks: paths must be
        readable where the replicas run."""
        from .formatting import validate_inputs
        from .sampling_params import check_params_list

        if self._session is None:
            raise RuntimeError("Use RayGenerator as a context manager: `with RayGenerator(...) as gen:`.")
        if on_error not in ("raise", "record"):
            raise ValueError(f'on_error must be "raise" or "record", got {on_error!r}.')
        inputs = validate_inputs(texts)
        n = len(inputs)
        check_params_list(params, n)
        if images is not None and len(images) != n:
            raise ValueError(f"images has {len(images)} entries for {n} prompts: give one per prompt (None for a "
                             "prompt without an image).")
        proxy = self._store_proxy(store)
        return self._run(inputs, params, near_duplicates, show_progress_bar,
                         dict(call, store=proxy, on_error=on_error, plain_prompts=plain_prompts), images)

    def _run(self, inputs: list, params, near_duplicates: float | None, show_progress_bar: bool,
             options: dict[str, Any], images: Sequence[Any] | None = None) -> Iterator[GenerationResult]:
        from tqdm.auto import tqdm

        n = len(inputs)
        summary = RayRunSummary(prompts=n, replicas=self.replicas)
        self.last_run = summary
        started = time.perf_counter()
        ready: list[GenerationResult] = []
        live = list(range(n))
        if near_duplicates is not None and n:
            from .dedup import near_duplicates as find_near_duplicates
            from .io import prompt_text

            texts = [prompt_text(p) for p in inputs]
            with_images = {i for i in range(n) if images is not None and images[i] is not None}
            candidates = [i for i in range(n) if i not in with_images]
            found = find_near_duplicates([texts[i] for i in candidates], threshold=near_duplicates)
            removed = {candidates[dup]: candidates[kept] for dup, kept in found.items()}
            ready = [GenerationResult(index=i, prompt=prompt_text(inputs[i]), duplicate_of=kept)
                     for i, kept in sorted(removed.items())]
            summary.near_duplicates = len(removed)
            live = [i for i in live if i not in removed]
        size = self.chunk_size or max(1, min(256, math.ceil(len(live) / (4 * self.replicas))))
        chunks = collections.deque(_chunks(inputs, params, live, size))
        summary.chunks = len(chunks)
        progress = tqdm(total=n, desc="Generating", unit="prompt", disable=not show_progress_bar or n == 0)
        finished: dict[int, GenerationResult] = {}
        ray = _import_ray()
        running: dict[Any, tuple[int, list[int]]] = {}
        free = list(range(len(self._actors)))
        try:
            for result in ready:
                finished[result.index] = result
                progress.update(1)
                yield result
            while chunks or running:
                while free and chunks:
                    chunk = chunks.popleft()
                    replica = free.pop(0)
                    ref = self._actors[replica].run.remote(
                        [inputs[i] for i in chunk], [params[i] for i in chunk] if params is not None else None,
                        options if images is None else {**options, "images": [images[i] for i in chunk]})
                    running[ref] = (replica, chunk)
                done, _ = ray.wait(list(running), num_returns=1)
                replica, chunk = running.pop(done[0])
                free.append(replica)
                try:
                    out = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    raise _ray_failure(err) from None
                self._add(summary, out["summary"], out["replica"], chunk)
                for result in out["results"]:
                    result.index = chunk[result.index]
                    if result.duplicate_of is not None:
                        result.duplicate_of = chunk[result.duplicate_of]
                    if result.error is not None:
                        result.error = _renumber(result.error, chunk)
                    finished[result.index] = result
                    progress.update(1)
                    yield result
                if out["error"] is not None:
                    raise self._error(out["error"], chunk, finished)
        finally:
            for ref in running:  # an error or an abandoned stream: the answers already committed stay
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            progress.close()
            summary.wall_time_s = time.perf_counter() - started
            summary.sequences = sum(len(r.texts) for r in finished.values())
            summary.failures = sorted((i, r.error) for i, r in finished.items() if r.error is not None)
            summary.failed = len(summary.failures)
            if self._emissions_csv is not None and summary.energy_kwh is not None:
                _append_emissions_row(self._emissions_csv, self.model_name_or_path, summary.wall_time_s,
                                      summary.energy_kwh, summary.emissions_kg_co2eq or 0.0, self.replicas)

    def _add(self, summary: RayRunSummary, run: RunSummary, replica: str, chunk: list[int]) -> None:
        """A chunk's numbers into the call's summary (and the generator's per-replica totals)."""
        for name in ("generated_tokens", "batches", "forward_passes", "oom_retries", "cached", "deduplicated",
                     "capped", "prompt_tokens", "prefix_cached_tokens"):
            setattr(summary, name, getattr(summary, name) + (getattr(run, name, 0) or 0))
        summary.batch_size = max(summary.batch_size, run.batch_size or 0)
        if run.prefix_caching is not None:
            summary.prefix_caching = bool(summary.prefix_caching) or run.prefix_caching
        if run.engine and run.engine not in summary.engine.split(", "):
            summary.engine = ", ".join(filter(None, [summary.engine, run.engine]))
            summary.engine_reason = run.engine_reason
        for name in ("energy_kwh", "emissions_kg_co2eq"):
            if getattr(run, name, None) is not None:
                setattr(summary, name, (getattr(summary, name) or 0.0) + getattr(run, name))
        for name in ("peak_rss_mb", "peak_cuda_mb"):
            if getattr(run, name, None) is not None:
                setattr(summary, name, max(getattr(summary, name) or 0.0, getattr(run, name)))
        for per_replica in (summary.per_replica, self.per_replica):
            stats = per_replica.setdefault(replica, {"prompts": 0, "tokens": 0, "energy_kwh": 0.0})
            stats["prompts"] += len(chunk)
            stats["tokens"] += run.generated_tokens or 0
            stats["energy_kwh"] += run.energy_kwh or 0.0

    @staticmethod
    def _error(info: dict[str, Any], chunk: list[int], finished: dict[int, GenerationResult]) -> BaseException:
        """A replica's error as the call's own (its prompt numbers those of the call)."""
        from .errors import BatchGenerationError

        cls, message = info["type"], _renumber(info["message"], chunk)
        if isinstance(cls, type) and issubclass(cls, BatchGenerationError):
            partial = {i: r.answer for i, r in finished.items() if r.error is None and r.duplicate_of is None}
            partial.update({chunk[i]: answer for i, answer in (info["partial"] or {}).items()})
            return BatchGenerationError(message, [chunk[i] for i in info["indices"] or []], partial)
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - an exception class that needs more than a message
            return RuntimeError(f"{getattr(cls, '__name__', cls)}: {message}")


# ---------------------------------------------------------------------------------------------- input records
def _clean(value: Any) -> Any:
    """A row as the file had it: columnar readers fill absent keys (and struct fields) with nulls or NaN."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not _missing(v)}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _to_record(index: int, row: dict[str, Any], fmt: str, where: str, prompt_field: str | None,
               messages_field: str | None, base: str | None = None):
    """One input row as io's ``InputRecord`` (the CLI's mapping), and the error that keeps it from running;
    relative image paths resolve against ``base`` (the input file's folder)."""
    from .io import InputError, InputRecord
    from .io.readers import make_record

    raw = _clean(row)
    try:
        if fmt == "txt":
            return InputRecord(index=index, prompt=raw.get("text", ""), source=where), None
        return make_record(index, raw, where, prompt_field=prompt_field, messages_field=messages_field,
                           from_text=fmt == "csv", base=base), None
    except InputError as err:
        name = messages_field or prompt_field or next((k for k in ("prompt", "text", "messages") if k in raw), None)
        prompt = raw.get(name) if name else None
        fields = {k: v for k, v in raw.items() if k != name}
        return InputRecord(index=index, prompt=prompt, fields=fields, source=where), str(err)


def _input_format(input: str | Sequence[str], input_format: str | None) -> str:
    from .io.formats import INPUT_SUFFIXES as _FORMATS

    if input_format:
        return {"json": "jsonl"}.get(input_format, input_format)
    first = input if isinstance(input, str) else input[0]
    name = re.sub(r"\.(gz|bz2|zst|zstd|lz4|snappy)$", "", str(first).rstrip("/"))
    suffix = os.path.splitext(name)[1].lower()
    if suffix in _FORMATS:
        if _FORMATS[suffix] == "json":
            raise ValueError(f"{first}: a .json file (one list) is not read on a cluster; write it as .jsonl, "
                             "one record per line.")
        return _FORMATS[suffix]
    if os.path.isdir(first):
        suffixes = {_FORMATS.get(os.path.splitext(f)[1].lower()) for f in os.listdir(first)} - {None}
        if len(suffixes) == 1:
            return suffixes.pop()
    raise ValueError(f"Cannot tell the format of {first!r}: pass input_format='jsonl' | 'csv' | 'parquet' | 'txt'.")


class RayDataSource:
    """The records of an input read with Ray Data (a file, folder, glob or list of them, local or any URI
    Ray reads: ``s3://``, ``gs://``...), as :class:`~simple_generation.io.InputRecord` objects in input
    order (``index``: the position in the input). Readable several times; needs Ray initialized.

    A row that cannot be a record (no prompt field, a wrong type) goes, as an ``InputError``, to
    ``records(on_invalid=...)`` (the index is used up); else, with ``on_invalid_record``, that gets the
    record (what the row had) and the reason, once per record however often the input is read; else
    reading raises the ``InputError``.

    Example:
        >>> with RayGenerator("gpt2") as gen:                                         # doctest: +SKIP
        ...     source = RayDataSource("s3://bucket/prompts/")
        ...     first = next(iter(source.records()))
    """

    def __init__(self, input: str | Sequence[str], *, input_format: str | None = None,
                 prompt_field: str | None = None, messages_field: str | None = None, limit: int | None = None,
                 on_invalid_record: Callable[[Any, str], None] | None = None):
        self.input = input if isinstance(input, str) else [str(p) for p in input]
        self.format = _input_format(input, input_format)
        if self.format not in ("jsonl", "csv", "parquet", "txt"):
            raise ValueError(f"input_format must be one of csv, jsonl, parquet, txt on a cluster, got "
                             f"{self.format!r}.")
        self.name = str(input) if isinstance(input, str) else str(input[0])
        self.prompt_field, self.messages_field, self.limit = prompt_field, messages_field, limit
        self.on_invalid_record = on_invalid_record
        self.problems: dict[int, tuple[str, str]] = {}

    def _dataset(self):
        ray = _import_ray()
        # No CPU asked for the reads: the replicas may hold every CPU of the cluster while the job reads on.
        io = {"num_cpus": 0}
        readers = {"jsonl": lambda p: ray.data.read_json(p, lines=True, **io),
                   "csv": lambda p: ray.data.read_csv(p, **io), "parquet": lambda p: ray.data.read_parquet(p, **io),
                   "txt": lambda p: ray.data.read_text(p, **io)}
        return readers[self.format](self.input)

    def records(self, on_invalid: Callable[[Exception], None] | None = None) -> Iterator[Any]:
        """Every record, in input order: Ray Data reads files in parallel, and with ``preserve_order`` gives
        its blocks back in input order (files in order, rows in file order), so a row's place in the
        iteration is its position in the input whatever the block boundaries: a rerun numbers alike."""
        from ray.data import DataContext

        from .io import InputError

        context = DataContext.get_current()
        preserve = context.execution_options.preserve_order
        context.execution_options.preserve_order = True
        try:
            dataset = self._dataset()
            from .io.readers import input_folder

            base = input_folder(self.name)
            index = 0
            for batch in dataset.iter_batches(batch_size=4096, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    if self.limit is not None and index >= self.limit:
                        return
                    record, error = _to_record(index, row, self.format, self.name, self.prompt_field,
                                               self.messages_field, base)
                    index += 1
                    if error is None:
                        yield record
                    elif on_invalid is not None:
                        on_invalid(InputError(error))
                    elif self.on_invalid_record is not None:
                        if record.index not in self.problems:
                            self.problems[record.index] = (self.name, error)
                            self.on_invalid_record(record, error)
                    else:
                        raise InputError(error)
        finally:
            context.execution_options.preserve_order = preserve


# ---------------------------------------------------------------------------------------------- emissions
def _append_emissions_row(path: str, model: str, duration: float, energy: float, emissions: float,
                          replicas: int) -> None:
    """One row for the whole call in codecarbon's columns, in the file ``emissions.emissions_csv_path`` chose."""
    from .emissions import codecarbon_columns

    header = codecarbon_columns()
    values = {
        "timestamp": datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"), "project_name": model,
        "run_id": str(uuid.uuid4()), "duration": duration, "emissions": emissions,
        "emissions_rate": emissions / duration if duration > 0 else 0.0, "energy_consumed": energy,
        "tracking_mode": f"ray ({replicas} replicas, summed)",
    }
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(header)
            writer.writerow([values.get(name, "") for name in header])
    except OSError as err:  # measuring must never lose the answers
        logger.warning("Could not write the job's emissions row to %s: %s", path, err)


# ---------------------------------------------------------------------------------------------- the job
def generate_dataset(
    input: str | Sequence[str],
    model: str,
    output: str,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    batch_size: int = 64,
    address: str | None = None,
    output_format: str | None = None,
    input_format: str | None = None,
    ordered: bool = True,
    prompt_field: str | None = None,
    messages_field: str | None = None,
    on_error: str = "record",
    model_kwargs: Mapping[str, Any] | None = None,
    track_emissions: bool = True,
    emissions_dir: str = ".",
    show_progress: bool = True,
    store: str | os.PathLike | bool | None = None,
    limit: int | None = None,
    near_dedup: float | None = None,
    **generation_options: Any,
) -> ClusterRunSummary:
    """Answer every record of ``input`` with ``model`` on a Ray cluster into ``output``, in input order;
    resumable through the store (a rerun generates only what it lacks).

    Example:
        >>> summary = generate_dataset("prompts.jsonl", "meta-llama/Llama-3.1-8B-Instruct",   # doctest: +SKIP
        ...                            "answers.jsonl", replicas=8, gpus_per_replica=1,
        ...                            address="auto", max_new_tokens=256, temperature=0)

    Args:
        input: a file, folder, glob or list of them, local or any URI Ray Data reads (``s3://``, ``gs://``...):
            ``.jsonl``, ``.csv``, ``.parquet`` or ``.txt`` (one prompt per line); ``input_format`` otherwise.
        model: hub id or folder, which every node must be able to load.
        output: one file on this machine, records in input order (jsonl, parquet, csv, by its suffix or
            ``output_format``), written by this process alone.
        replicas: actors, each holding one model (``gpus_per_replica`` GPUs and ``cpus_per_replica`` CPUs).
        batch_size: prompts per replica call; also each replica's batch size (halved on out-of-memory).
        address: a running cluster (``"auto"``, ``"host:6379"``); without it, and without ``ray.init()`` done
            by the caller, a local Ray instance is started (and stopped).
        ordered: kept for older callers: the output is always one file in input order; ``False`` (the old
            folder of part files) is refused.
        prompt_field / messages_field: the column holding the prompt (default ``prompt``, else ``text``)
            or chat messages; every other column is carried into the output record.
        on_error: ``"record"``: a record that cannot run gets an ``error`` and the job goes on; ``"raise"``.
        model_kwargs: for each replica's ``SimpleGenerator`` (``system_prompt``, ``lora_weights``, ``dtype``...).
        track_emissions: one ``emissions.csv`` row in ``emissions_dir`` per call, all replicas summed.
        store: the SQLite store of finished answers, on this machine's disk (default ``<output>.sqlite``;
            ``False``: none, a rerun starts over). The same store as a local run's: either reuses the other's.
        limit: the first ``limit`` records only. near_dedup: skip records this similar to an earlier one.
        **generation_options: for ``SimpleGenerator.generate`` (``max_new_tokens``, ``temperature``,
            ``skip_prompt``, ``seed``...).

    Returns:
        a :class:`ClusterRunSummary`.
    """
    from .io import OrderedWriter, output_record
    from .io.writers import output_format_for
    from .jobs import JobOptions, open_store, run_job, store_path

    if not ordered:
        raise ValueError("ordered=False (a folder of part files) is no longer supported: the output is one file in "
                         "input order, and a rerun resumes from the store (<output>.sqlite).")
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}.")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    output_path = Path(output)
    if output_path.is_dir():
        raise ValueError(f"{output} is a folder; the output is one file (the folder of parts is gone: its records "
                         "are not reused; move it away).")
    fmt = output_format_for(output, output_format)
    path = store_path(store=None if isinstance(store, bool) else store, output=output, no_store=store is False)
    opened = open_store(path)  # checked before anything is written or loaded
    if opened is not None:
        opened.close()
    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("track_emissions", track_emissions)
    kwargs.setdefault("emissions_dir", emissions_dir)
    call = dict(generation_options)
    skip_prompt = bool(call.pop("skip_prompt", False))
    truncate = bool(call.pop("truncate_prompts", False))
    failures: list[tuple[int, str, str]] = []
    summary = ClusterRunSummary(output=str(output), store=path)
    with RayGenerator(model, replicas=replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                      address=address, show_progress=show_progress, chunk_size=batch_size, **kwargs) as gen:
        with OrderedWriter(output, fmt, model=str(model)) as writer:
            def invalid(record, error: str) -> None:  # a row that is no record: its output record says why
                if on_error == "raise":
                    from .io import InputError

                    raise InputError(error)
                failures.append((record.index, record.source, error))
                writer.add(record.index, output_record(record, {"error": error}))

            source = RayDataSource(input, input_format=input_format, prompt_field=prompt_field,
                                   messages_field=messages_field, limit=limit, on_invalid_record=invalid)
            options = JobOptions(store=path, near_dedup=near_dedup, on_error=on_error, skip_prompt=skip_prompt,
                                 output_format=fmt, generation=call, batch_size=batch_size, truncate_prompts=truncate,
                                 show_progress=show_progress)
            job = run_job(gen, source, writer, options)
        per_replica = gen.per_replica
    summary.records = job.records + len(failures)
    summary.already_done = job.cached
    summary.generated = summary.records - job.cached - job.near_duplicates
    summary.failures = sorted(failures + job.failures)[:MAX_FAILURES_LISTED]
    summary.errors = len(failures) + job.failed
    summary.generated_tokens = job.generated_tokens
    summary.wall_time_s = job.wall_time_s
    summary.energy_kwh, summary.emissions_kg_co2eq = job.energy_kwh, job.emissions_kg_co2eq
    summary.per_replica = per_replica
    logger.info(
        "%d records (%d from the store): generated %d in %.1fs, %.2f prompts/s, %.1f tokens/s, %d error(s)%s.",
        summary.records, summary.already_done, summary.generated, summary.wall_time_s, summary.prompts_per_second,
        summary.tokens_per_second, summary.errors,
        f", {summary.energy_kwh:.3g} kWh" if summary.energy_kwh is not None else "")
    return summary
