"""The gateway's cost model service: the model in force, the request log, and periodic refits.

* **Start**: load the current version from ``cost_model.dir`` if there is one, else a cold
  start (latency priors from the instances' engine profiles, a length prior); groups of the
  fleet that the loaded model does not know get their prior.
* **Observe**: every completed request's record (features, actuals, predictions; no prompt
  text unless configured) is encoded once by the background task, off the event loop, kept in
  memory as that JSON line (the newest ``max_records``; only the refit's process parses them)
  and appended to ``DIR/requests.jsonl``.
* **Refit**: every ``refit_interval_s``, once ``min_new_samples`` new records arrived, a worker
  process fits new models (:func:`scheduler.costmodel.online.refit`) and saves a version; the
  gateway then swaps the model in one assignment (decisions in progress keep the old one).

One background task, owned here; :meth:`CostModelService.close` cancels and awaits it, writes
what is buffered and shuts the worker process down.

**Replicas** (:meth:`CostModelService.share`): every replica appends its completed-request
records to the durable stream ``records`` (JSON lines, up to ``MESSAGE_BYTES`` a message) and
keeps every other replica's lines too (so a new leader has them); only the replica whose
``duties_here`` says so (the leader) refits, stores the new
version as a blob and names it in the ``pdgate_cost_model`` bucket; every other replica loads
that version when it is named, without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdgate.common.json_codec import json_encoder
from pdgate.gateway.config import CostModelConfig
from pdgate.scheduler.costmodel.calibration import LengthCalibration, StepCalibration
from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec, step_time_of
from pdgate.scheduler.costmodel.model import CostModel

if TYPE_CHECKING:
    from pdgate.gateway.sharing import SharedState

log = logging.getLogger("pdgate.costs")

LOG_NAME = "requests.jsonl"
FLUSH_INTERVAL_S = 1.0
MODEL_BUCKET = "pdgate_cost_model"
RECORDS_STREAM = "records"
RECORDS_PER_MESSAGE = 200
MIN_CALIBRATION_TOKENS = 8  # a shorter answer's TPOT is mostly its first steps' noise
MESSAGE_BYTES = 512 * 1024  # half NATS's default limit (1 MB); a long prompt's record is ~35 kB


class RecordWindow:
    """The newest records (encoded lines): at most ``max_records`` of them and ``max_bytes`` in
    all (a record of a long prompt's text features is ~50 kB: the count alone would let 50,000
    of them take 2.5 GB)."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lines: collections.deque[bytes] = collections.deque()

    def extend(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self._lines.append(line)
            self.bytes += len(line)
        while self._lines and (len(self._lines) > self.max_records or self.bytes > self.max_bytes):
            self.bytes -= len(self._lines.popleft())

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._lines)


class CostModelService:
    """``clock`` times the refits; ``inline`` runs encoding and refits on the loop's thread, in
    the call (``pdgate simulate``: deterministic on a virtual clock, where work in a thread or
    process would land at whatever virtual time it happened to finish)."""

    def __init__(
        self,
        config: CostModelConfig,
        prior_specs: Mapping[str, PriorSpec],
        *,
        clock: Callable[[], float] = time.monotonic,
        inline: bool = False,
    ) -> None:
        self.config = config
        self.clock = clock
        self.inline = inline
        self.prior_specs = dict(prior_specs)
        self.current: CostModel | None = None
        # the training set: the newest records as JSON lines (a quarter of the memory of the dicts
        # for a long prompt's text features); parsed only in the refit's process
        self.records = RecordWindow(config.max_records, config.max_records_mib << 20)
        self._unencoded: list[dict[str, Any]] = []  # completed since the last write-out
        self._new_since_fit = 0
        self._task: asyncio.Task[None] | None = None
        self._executor: ProcessPoolExecutor | None = None
        self.refits = 0
        self.refit_failures = 0
        self.dir = Path(config.dir) if config.dir else None
        self.shared: SharedState | None = None
        self.duties_here: Callable[[], bool] = lambda: True  # whether this replica refits
        self._unshared: list[bytes] = []  # encoded records not yet in the shared stream
        self._encode = json_encoder()
        self.calibration = StepCalibration()
        self.length_calibration = LengthCalibration()

    # ------------------------------------------------------------ lifecycle
    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread, or in the call when ``inline``."""
        return fn(*args) if self.inline else await asyncio.to_thread(fn, *args)

    async def start(self) -> None:
        self.current = await self._off_loop(self._initial_model)
        if self.dir is not None and self.config.log_requests:
            self.records.extend(await self._off_loop(self._read_log_tail))
        self._task = asyncio.create_task(self._loop(), name="cost-model")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._write_out()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _initial_model(self) -> CostModel:
        from pdgate.scheduler.costmodel.output_length import OutputLengthModel

        loaded = None
        if self.dir is not None and self.dir.exists():
            from pdgate.scheduler.costmodel.store import ModelStore

            try:
                loaded = ModelStore(self.dir).load_current()
            except ValueError as exc:
                log.error("cost model in %s not loaded (%s); starting from the priors", self.dir, exc)
        if loaded is not None:
            components, meta = loaded
            latency = components.get("latency")
            latency = (
                latency.with_prior_specs(self.prior_specs)
                if isinstance(latency, LatencyModel)
                else LatencyModel.from_priors(self.prior_specs)
            )
            output = components.get("output_length") or OutputLengthModel.prior()
            version = str(meta.get("version") or meta.get("name") or "loaded")
            log.info("cost model %s loaded from %s", version, self.dir)
            return CostModel(latency, output, version)
        return CostModel(LatencyModel.from_priors(self.prior_specs), OutputLengthModel.prior(), "prior")

    def add_priors(self, specs: Mapping[str, PriorSpec]) -> None:
        """Latency priors for cost groups that instances added at run time bring (known ones are kept)."""
        new = {group: spec for group, spec in specs.items() if group not in self.prior_specs}
        if not new:
            return
        self.prior_specs.update(new)
        current = self.current
        if current is not None:
            self.current = replace(current, latency=current.latency.with_prior_specs(new))

    def share(self, shared: SharedState, duties_here: Callable[[], bool]) -> None:
        """Share records and model versions with the other replicas (before :meth:`start`)."""
        self.shared = shared
        self.duties_here = duties_here
        shared.follow(RECORDS_STREAM, self._on_records)
        shared.watch(MODEL_BUCKET, self._on_model)

    # -------------------------------------------------------------- observe
    def observe(self, record: dict[str, Any]) -> None:
        self._unencoded.append(record)
        self._new_since_fit += 1
        self._calibrate(record)
        self._calibrate_length(record)

    def _calibrate_length(self, record: dict[str, Any]) -> None:
        """The length model's error on this request (actual output tokens against the median it
        was served with) into its answering model's scale; a scale that moved is put in force."""
        current = self.current
        predicted = record.get("predicted") or {}
        served = predicted.get("output_median")
        actual = record.get("output_tokens")
        if current is None or not served or not actual or record.get("length_fixed"):
            return
        if record.get("cost_model") not in (None, current.version):
            return  # predicted by an earlier model: its error is the one the refit already took in
        scale = predicted.get("output_scale")
        scale = 1.0 if scale is None else scale
        if self.length_calibration.observe_output(
            str(record.get("model")), float(served), int(actual), record.get("max_tokens"), float(scale)
        ):
            self.current = replace(current, length_scale=dict(self.length_calibration.in_force))

    def _calibrate(self, record: dict[str, Any]) -> None:
        """The decode step model's error on this request (its actual TPOT against the uncorrected
        step time of the batch and context it decoded in) into the group's scale; a scale that
        moved is put in force at once (a new :class:`CostModel`, same version)."""
        current = self.current
        placement = record.get("placement") or {}
        group, batch, context = (
            placement.get("decode_group"),
            placement.get("decode_batch"),
            placement.get("decode_context_tokens"),
        )
        actual = (record.get("timing") or {}).get("tpot_s")
        if current is None or not group or not batch or context is None or actual is None:
            return
        if int(record.get("output_tokens") or 0) < MIN_CALIBRATION_TOKENS:
            return
        predicted = current.latency.costs(group).decode_step_s(float(batch), float(context))
        if self.calibration.observe(group, predicted, step_time_of(float(actual), placement)):
            self.current = replace(current, tpot_scale=dict(self.calibration.in_force))

    @property
    def held(self) -> int:
        """Records a refit would use now."""
        return len(self.records) + len(self._unencoded)

    @property
    def _logging(self) -> bool:
        return self.dir is not None and self.config.log_requests

    async def _write_out(self) -> None:
        """Encode the records completed since the last time, once each (a record with a long
        prompt's text features is tens of kB of JSON and a millisecond of CPU), for the training
        set, the log and the shared stream."""
        if not self._unencoded:
            return
        batch, self._unencoded = self._unencoded, []  # on the loop's thread: no append is lost
        lines = await self._off_loop(self._encode_and_log, batch)
        self.records.extend(lines)
        if self.shared is not None:
            self._unshared.extend(lines)

    async def _on_records(self, data: bytes) -> None:
        """Another replica's records: into the training set as they came (cut into lines, not parsed)."""
        lines = shared_lines(data)
        self.records.extend(lines)
        self._new_since_fit += len(lines)

    async def _on_model(self, key: str, value: dict[str, Any]) -> None:
        """Another replica (the leader) put a new version in force: load it."""
        version = str(value.get("version"))
        current = self.current
        if self.shared is None or (current is not None and current.version == version):
            return
        blob = await self.shared.get_blob(str(value.get("blob")))
        if blob is None:
            log.error("cost model %s named by replica %s, but its blob cannot be read", version, value.get("replica"))
            return
        components = await asyncio.to_thread(_loads, blob)
        self.calibration.reset()
        self.length_calibration.reset()
        self.current = CostModel(
            components["latency"].with_prior_specs(self.prior_specs), components["output_length"], version
        )
        log.info("cost model %s in force (refitted by replica %s)", version, value.get("replica"))

    async def _share_records(self) -> None:
        """Append what this replica completed to the shared stream, up to ``RECORDS_PER_MESSAGE``
        records and ``MESSAGE_BYTES`` a message; kept (the newest ``max_records``) while NATS is
        away, dropped if refused."""
        shared = self.shared
        while shared is not None and self._unshared:
            count, size = 0, 0
            for line in self._unshared[:RECORDS_PER_MESSAGE]:
                if count and size + len(line) > MESSAGE_BYTES:
                    break
                count, size = count + 1, size + len(line) + 1
            if not await shared.append(RECORDS_STREAM, b"\n".join(self._unshared[:count])):
                if not shared.connected:
                    self._unshared = self._unshared[-self.config.max_records :]
                    return
                log.warning("cost model: %d records refused by the shared stream; dropped", count)
            del self._unshared[:count]

    async def _publish_model(self, model: CostModel) -> None:
        if self.shared is None:
            return
        blob = await asyncio.to_thread(_dumps, {"latency": model.latency, "output_length": model.output})
        name = f"cost-model-{model.version}"
        if await self.shared.put_blob(name, blob):
            value = {"version": model.version, "blob": name, "replica": self.shared.replica_id}
            await self.shared.put(MODEL_BUCKET, "current", value)

    # ---------------------------------------------------------- background
    async def _loop(self) -> None:
        next_fit = self.clock() + self.config.refit_interval_s
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self._write_out()
            await self._share_records()
            if self.clock() >= next_fit:
                next_fit = self.clock() + self.config.refit_interval_s
                if self._new_since_fit >= self.config.min_new_samples and self.duties_here():
                    name = await self.refit_now()
                    if name is not None and self.current is not None:
                        await self._publish_model(self.current)

    async def refit_now(self) -> str | None:
        """Refit on the records in memory in the worker process and swap the model in."""
        await self._write_out()
        current = self.current
        if current is None or not self.records:
            return None
        self._new_since_fit = 0
        from pdgate.scheduler.costmodel.online import refit_lines

        args = (
            list(self.records),
            current.latency,
            current.output,
            self.config.q_high,
            str(self.dir) if self.dir is not None else None,
        )
        try:
            if self.inline:
                components, version, meta = refit_lines(*args)
            else:
                if self._executor is None:
                    self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
                loop = asyncio.get_running_loop()
                components, version, meta = await loop.run_in_executor(self._executor, refit_lines, *args)
        except Exception as exc:
            self.refit_failures += 1
            log.error("cost model refit failed: %r", exc)
            return None
        latency = components["latency"].with_prior_specs(self.prior_specs)
        self.refits += 1
        name = Path(version).name if version else f"memory-{self.refits}"
        if self.shared is not None:  # versions from several replicas over time: unique names
            name = f"{self.shared.replica_id}-{name}"
        self.calibration.reset()
        self.length_calibration.reset()
        self.current = CostModel(latency, components["output_length"], name)
        log.info(
            "cost model %s in force (%s records, fit %.2fs)", name, meta.get("n_records"), meta.get("fit_seconds", 0)
        )
        return name

    def _encode_and_log(self, batch: list[dict[str, Any]]) -> list[bytes]:
        """``batch`` as JSON lines, appended to the request log when there is one (off the event loop)."""
        encode = self._encode
        lines = [encode(r) for r in batch]
        if self._logging and self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            with (self.dir / LOG_NAME).open("ab") as f:
                f.write(b"\n".join(lines) + b"\n")
        return lines

    def _read_log_tail(self) -> list[bytes]:
        """The log's newest ``max_records`` lines (a torn last line after a crash is skipped by the refit)."""
        path = self.dir / LOG_NAME if self.dir is not None else None
        if path is None or not path.exists():
            return []
        with path.open("rb") as f:
            tail = collections.deque((line.rstrip(b"\n") for line in f if line.strip()), maxlen=self.config.max_records)
        return list(tail)


def _dumps(components: dict[str, Any]) -> bytes:
    import joblib

    buffer = io.BytesIO()
    joblib.dump(components, buffer)
    return buffer.getvalue()


def _loads(blob: bytes) -> dict[str, Any]:
    """A model version another replica of this gateway stored (a pickle: only from our own NATS)."""
    import joblib

    loaded: dict[str, Any] = joblib.load(io.BytesIO(blob))
    return loaded


def shared_lines(data: bytes) -> list[bytes]:
    """The records of one message of the shared stream, as JSON lines: one record a line (older
    replicas sent a JSON array, re-encoded here)."""
    if data[:1] != b"[":
        return [line for line in data.split(b"\n") if line]
    try:
        rows = json.loads(data)
    except ValueError:
        log.warning("cost model: a malformed batch of shared records ignored")
        return []
    if not isinstance(rows, list):
        return []
    encode = json_encoder()
    return [encode(r) for r in rows if isinstance(r, dict)]
