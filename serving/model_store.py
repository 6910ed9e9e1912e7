"""Model lifecycle: fetch, check, warm up, serve, watch the registry alias, swap, unload.

A `LoadedModel` is one model version ready to serve: its ORT graphs, its state arena (state
shapes belong to a version, so state never crosses versions), its micro-batcher and the one
executor thread that runs its ORT calls.

`ModelStore` holds the current version and the retired ones that still have live series. New
series start on the current version; a running series stays on its version until it ends,
resets or expires; a retired version is unloaded once its last series is gone and no call is in
flight.

The alias watch tells two kinds of failure apart. Anything that goes wrong before a version's
files are on local disk -- resolving the alias, asking for the version's artifact location,
downloading (registry down, network errors, timeouts, HTTP 5xx...) -- is the registry's problem,
not the version's: the check is retried with capped exponential backoff (`retry_delay`), the
current version keeps serving and health stays SERVING. A version whose files arrived but that
breaks the contract or fails warm-up is refused for good (logged once, not retried).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.batcher import MicroBatcher
from serving.config import BatchConfig, ModelSourceConfig, RuntimeConfig, StateConfig
from serving.contract import ModelSpec
from serving.domain import ModelDescription
from serving.errors import ModelContractError, ModelNotReady, RegistryUnavailable, ServingError, UnknownModel
from serving.runtime import OrtModel
from serving.state import StateArena
from serving.stepper import INLINE_MAX_ROWS, BatchObserver, StepProcessor

log = logging.getLogger(__name__)

STEP_GRAPH, SEQUENCE_GRAPH = "model.onnx", "sequence.onnx"
DEFAULT_LOCAL_NAME = "forecaster"
WARM_UP_TIMESTAMP_MS = 1_388_534_400_000  # 2014-01-01T00:00Z, inside any plausible training range
# After a failed alias check the next one comes this soon, then twice as late after each further
# failure, up to the watch interval: a blip is over within a second or two, and a registry that
# stays down is polled no more often than a healthy one.
RETRY_FIRST_S = 1.0


def retry_delay(failures: int, interval_s: float) -> float:
    """Seconds until the next alias check after `failures` consecutive failed ones."""
    if failures <= 0:
        return interval_s
    return min(interval_s, RETRY_FIRST_S * 2.0 ** min(failures - 1, 30))


@dataclass(frozen=True)
class ModelRef:
    """A parsed --model-uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a local directory."""

    uri: str
    name: str
    alias: str | None = None
    version: str | None = None
    local_dir: Path | None = None

    @classmethod
    def parse(cls, uri: str, local_name: str | None = None) -> ModelRef:
        if uri.startswith("models:/"):
            rest = uri.removeprefix("models:/").strip("/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                if name and alias and "/" not in name:
                    return cls(uri, name, alias=alias)
            elif rest.count("/") == 1 and all(rest.split("/")):
                name, version = rest.split("/")
                return cls(uri, name, version=version)
            raise ValueError(f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ValueError(f"model URI {uri!r}: neither models:/... nor an existing directory")
        return cls(uri, local_name or DEFAULT_LOCAL_NAME, local_dir=path.resolve())


def find_graphs(root: Path) -> tuple[Path, Path]:
    """The step graph nearest the top of root, and the sequence graph beside or below it.

    An MLflow ONNX-flavor download holds `model.onnx` at its top and `sequence.onnx` (logged as
    an extra file) in `extra_files/`; a plain export has both side by side.
    """

    def shallowest(under: Path, name: str) -> Path | None:
        found = sorted(under.rglob(name), key=lambda p: (len(p.parts), str(p)))
        return found[0] if found else None

    step = shallowest(root, STEP_GRAPH)
    sequence = shallowest(step.parent, SEQUENCE_GRAPH) if step is not None else None
    if step is None or sequence is None:
        found = [str(p.relative_to(root)) for p in root.rglob("*.onnx")]
        raise ModelContractError(f"{root}: needs {STEP_GRAPH} with {SEQUENCE_GRAPH} beside or below it (has {found})")
    return step, sequence


class LoadedModel:
    """One model version ready to serve."""

    def __init__(
        self,
        name: str,
        version: str,
        ort_model: OrtModel,
        batch: BatchConfig,
        state: StateConfig,
        observe_batch: BatchObserver | None = None,
    ) -> None:
        self.name, self.version, self.ort = name, version, ort_model
        spec = ort_model.spec
        self.arena = StateArena(ort_model.state, state.initial_capacity, state.max_series)
        # One thread: ORT calls of a version run one at a time (the CUDA path keeps state in it).
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{name}-{version}")
        process = StepProcessor(
            functools.partial(ort_model.step, self.arena), self.arena, spec, version,
            self.executor, batch.max_batch_size, observe_batch,
        )  # fmt: skip
        # Batches small enough to run on the event loop wait one loop turn for more rows (see batcher).
        self.batcher = MicroBatcher(
            process, batch.max_batch_size, batch.max_batch_delay_s, turn_below_rows=INLINE_MAX_ROWS
        )
        self.max_batch_size = batch.max_batch_size
        self.inflight = 0  # unary calls running on this version
        self.retired = False

    @property
    def spec(self) -> ModelSpec:
        return self.ort.spec

    @property
    def provider(self) -> str:
        return self.ort.provider

    def describe(self) -> ModelDescription:
        state_bytes = sum(t.bytes_per_series() for t in self.ort.state)
        return ModelDescription(
            self.name, self.version, self.provider, self.spec, state_bytes, tuple(self.ort.state), self.max_batch_size
        )

    async def sequence(self, values: np.ndarray, timestamps_ms: np.ndarray, covariates: np.ndarray) -> np.ndarray:
        """Run the sequence graph on [B, T] histories from zero state -> forecast [B, horizon, Q].

        Callers hold `inflight` up for the whole call so the version is not unloaded under them.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.ort.sequence, values, timestamps_ms, covariates)

    @property
    def idle(self) -> bool:
        return self.arena.live_count == 0 and self.inflight == 0 and self.batcher.pending_rows == 0

    async def close(self) -> None:
        await self.batcher.close()
        self.executor.shutdown(wait=True)


def _local_version(step_path: Path) -> str:
    digest = hashlib.sha256(step_path.read_bytes()).hexdigest()
    return f"local-{digest[:12]}"


class ModelStore:
    def __init__(
        self,
        source: ModelSourceConfig,
        runtime: RuntimeConfig,
        batch: BatchConfig,
        state: StateConfig,
        observe_batch: BatchObserver | None = None,
        on_change: Callable[[LoadedModel], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        on_watch_failure: Callable[[], None] | None = None,
    ) -> None:
        self.ref = ModelRef.parse(source.model_uri, source.model_name)
        self._source, self._runtime, self._batch, self._state = source, runtime, batch, state
        self._observe_batch = observe_batch
        self._on_change, self._on_refused, self._on_watch_failure = on_change, on_refused, on_watch_failure
        self.current: LoadedModel | None = None
        self.retired: list[LoadedModel] = []
        self.refused: set[str] = set()  # versions that broke the contract or failed warm-up: not retried
        self._seen: str | None = None  # the last version the alias was seen at (logged once per version)
        self._closing: set[asyncio.Task] = set()

    # -- lookups used by the data plane ---------------------------------------------------------

    def get(self, name: str = "", version: str = "") -> LoadedModel:
        """The current version; `name` and `version` (if given) must be the served model's.

        Only the current version is served to new requests: retired versions keep stepping the
        series that started on them, but cannot be asked for.
        """
        model = self.current
        if model is None:
            raise ModelNotReady("no model is loaded yet; wait for the health check to report SERVING")
        if name and name != model.name:
            raise UnknownModel(f"unknown model {name!r}: this server serves {model.name!r}")
        if version and version != model.version:
            raise UnknownModel(
                f"model {model.name!r} has no version {version!r} served here: this server serves version "
                f"{model.version!r} (leave the version empty for it)"
            )
        return model

    def loaded(self) -> list[LoadedModel]:
        return ([self.current] if self.current else []) + self.retired

    # -- loading --------------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        return self.ref.alias is not None and self._source.watch_interval_s > 0

    def _registry_client(self):  # mlflow is imported only for registry URIs: it is slow to import
        from mlflow import MlflowClient

        uri = self._source.tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def resolve_version(self) -> str:
        """The version the URI points at now (blocking: asks the registry for an alias).

        Raises RegistryUnavailable when the registry cannot say.
        """
        if self.ref.local_dir is not None:
            return _local_version(find_graphs(self.ref.local_dir)[0])
        if self.ref.version is not None:
            return self.ref.version
        try:
            mv = self._registry_client().get_model_version_by_alias(self.ref.name, self.ref.alias)
        except Exception as exc:  # MlflowException, connection errors, timeouts: all mean "cannot resolve now"
            raise RegistryUnavailable(f"{self.ref.uri}: cannot resolve the alias: {exc}") from exc
        return str(mv.version)

    def _open(self, version: str) -> OrtModel:
        """Fetch (if from the registry), open, check and warm up one version (blocking).

        Raises RegistryUnavailable when the files cannot be fetched; any other error is the
        version's own (contract, warm-up).
        """
        if self.ref.local_dir is not None:
            return self._open_dir(self.ref.local_dir)
        import mlflow.artifacts

        tmp = Path(tempfile.mkdtemp(prefix=f"forecast-{self.ref.name}-v{version}-"))
        try:
            uri = self._source.tracking_uri
            try:
                # The version's artifact location from our own client, then a plain download from
                # it: mlflow's models:/ download resolves the version through the process-wide
                # registry URI (MLFLOW_TRACKING_URI), not the one passed in, so --tracking-uri
                # alone fetched from another registry than the one the alias was read from.
                source = self._registry_client().get_model_version_download_uri(self.ref.name, version)
                mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri)
            except Exception as exc:  # the registry's or the network's failure, not the version's
                raise RegistryUnavailable(f"models:/{self.ref.name}/{version}: download failed: {exc}") from exc
            return self._open_dir(tmp)  # ORT holds the graphs in memory; the files can go
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _open_dir(self, directory: Path) -> OrtModel:
        step, sequence = find_graphs(directory)
        model = OrtModel(step, sequence, self._runtime)
        sizes = tuple(sorted({1, min(self._batch.max_batch_size, 256)}))
        model.warm_up(sizes, WARM_UP_TIMESTAMP_MS)
        return model

    async def load(self, version: str) -> LoadedModel:
        ort_model = await asyncio.to_thread(self._open, version)
        return LoadedModel(self.ref.name, version, ort_model, self._batch, self._state, self._observe_batch)

    async def start(self) -> LoadedModel:
        """Load the initial version; errors propagate (the server cannot start without a model)."""
        version = await asyncio.to_thread(self.resolve_version)
        model = await self.load(version)
        self._install(model)
        return model

    async def check_once(self) -> bool:
        """Swap to the version the alias points at now, if it changed and loads; True on a swap.

        Raises RegistryUnavailable when the alias or the version's files cannot be fetched (the
        version is not refused: the caller retries); refuses a version that fails otherwise.
        """
        version = await asyncio.to_thread(self.resolve_version)
        current = self.current
        if (current is not None and version == current.version) or version in self.refused:
            return False
        if version != self._seen:
            self._seen = version
            log.info("event=model_version_seen name=%s version=%s", self.ref.name, version)
        try:
            model = await self.load(version)
        except RegistryUnavailable:
            raise
        except Exception as exc:  # the files are here and do not serve: refuse it, keep serving the current one
            self.refused.add(version)
            if self._on_refused is not None:
                self._on_refused(version)
            log.error(
                "event=model_refused name=%s version=%s keeps=%s error=%r",
                self.ref.name, version, current.version if current else None, str(exc),
                exc_info=not isinstance(exc, ServingError),
            )  # fmt: skip
            return False
        self._install(model)
        return True

    async def watch(self) -> None:
        """Poll the alias forever (cancel the task to stop); back off while the registry fails.

        A streak of failures is logged when it starts (warning) and when it ends (info); each
        failed check is counted (on_watch_failure), the retries in between are debug lines.
        """
        interval, failures = self._source.watch_interval_s, 0
        while True:
            await asyncio.sleep(retry_delay(failures, interval))
            try:
                await self.check_once()
            except RegistryUnavailable as exc:
                failures += 1
                if self._on_watch_failure is not None:
                    self._on_watch_failure()
                delay = retry_delay(failures, interval)
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level, "event=model_watch_failing uri=%s failures=%d retry_in_s=%.3g keeps=%s error=%r",
                    self.ref.uri, failures, delay, self.current.version if self.current else None, str(exc),
                )  # fmt: skip
                continue
            if failures:
                log.info("event=model_watch_recovered uri=%s failures=%d", self.ref.uri, failures)
                failures = 0

    def _install(self, model: LoadedModel) -> None:
        old, self.current = self.current, model
        log.info(
            "event=model_serving name=%s version=%s provider=%s cell=%s horizon=%d quantiles=%s "
            "freq_ms=%d covariates=%s state=%s state_bytes_per_series=%d previous=%s",
            model.name, model.version, model.provider, model.spec.cell, model.spec.horizon,
            ",".join(map(str, model.spec.quantiles)), model.spec.freq_ms,
            ",".join(model.spec.covariates) or "-", ",".join(model.spec.state_names),
            model.arena.bytes_per_series, old.version if old else None,
        )  # fmt: skip
        if old is not None:
            old.retired = True
            self.retired.append(old)
            self.release(old)
        if self._on_change is not None:
            self._on_change(model)

    def release(self, model: LoadedModel) -> None:
        """Unload a retired version once nothing uses it any more (call after freeing its series)."""
        if model.retired and model.idle and model in self.retired:
            self.retired.remove(model)
            log.info("event=model_unloaded name=%s version=%s", model.name, model.version)
            task = asyncio.get_running_loop().create_task(model.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for model in self.loaded():
            await model.close()
        self.current, self.retired = None, []
        if self._closing:
            await asyncio.gather(*self._closing)
