"""The NVML boundary: what the GPU and NVLink collectors need, and one session over pynvml.

`Nvml` is the narrow interface the collectors depend on. `NvmlSession` implements it over
pynvml and is shared by both collectors (`shared_session`): it loads the library, keeps the
device handles and static identity, fetches every field value of a GPU in one batched call
per tick for whichever collector asks first, pairs GPM samples across ticks, caches NVLink
remote ends, and counts XID events from a background waiter thread.

Without a usable driver every call to `gpus()` raises SourceUnavailableError("NVML not available:
..."); the reason is logged once when that state starts and once when it ends, and NVML
initialisation is retried at most every `retry_interval_s`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import pynvml

from agent.common.errors import FabricError
from agent.node.errors import CollectorError, SourceUnavailableError

if TYPE_CHECKING:
    from agent.node.collectors.base import CollectorContext, Tick

log = logging.getLogger(__name__)

T = TypeVar("T")

# Retrying nvmlInit is cheap but a missing driver stays missing for a while; operators
# expect recovery within a minute of loading the driver.
RETRY_INTERVAL_S = 30.0
# NVML documents GPM samples as meaningful only when at least 100 ms apart.
GPM_MIN_INTERVAL_S = 0.1
# The waiter wakes this often to notice close(); it bounds how long close() blocks.
EVENT_WAIT_MS = 200

FI_MEMORY_TEMP = pynvml.NVML_FI_DEV_MEMORY_TEMP
FI_NVLINK_LINK_COUNT = pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT
FI_NVLINK_TX_KIB = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
FI_NVLINK_RX_KIB = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
FI_NVLINK_SPEED_MBPS = pynvml.NVML_FI_DEV_NVLINK_GET_SPEED
FI_NVLINK_STATE = pynvml.NVML_FI_DEV_NVLINK_GET_STATE
NVLINK_STATE_ACTIVE = pynvml.NVML_NVLINK_STATE_ACTIVE

# GPM names per-link NVLink rates with consecutive ids only up to link 17.
_GPM_MAX_LINKS = 18
_GPM_NVLINK_L0_RX = pynvml.NVML_GPM_METRIC_NVLINK_L0_RX_PER_SEC
_MIB = 1 << 20

_CRITICAL_EVENTS = {
    pynvml.nvmlEventTypeDoubleBitEccError: "double_bit_ecc",
    pynvml.nvmlEventTypeDramRetirementFailure: "dram_retirement_failure",
    pynvml.nvmlEventTypeFatalPoisonError: "fatal_poison",
    pynvml.nvmlEventTypeGpuUnavailableError: "gpu_unavailable",
}

_NVLINK_VERSIONS = {
    pynvml.NVML_NVLINK_VERSION_1_0: "1.0",
    pynvml.NVML_NVLINK_VERSION_2_0: "2.0",
    pynvml.NVML_NVLINK_VERSION_2_2: "2.2",
    pynvml.NVML_NVLINK_VERSION_3_0: "3.0",
    pynvml.NVML_NVLINK_VERSION_3_1: "3.1",
    pynvml.NVML_NVLINK_VERSION_4_0: "4.0",
    pynvml.NVML_NVLINK_VERSION_5_0: "5.0",
    pynvml.NVML_NVLINK_VERSION_6_0: "6.0",
}
_REMOTE_TYPES = {
    pynvml.NVML_NVLINK_DEVICE_TYPE_GPU: "gpu",
    pynvml.NVML_NVLINK_DEVICE_TYPE_IBMNPU: "ibmnpu",
    pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH: "switch",
}
# nvmlValue_t member for each nvmlValueType_t.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
# Bits of nvmlDeviceGetCurrentClocksEventReasons, named as the NVML constants are.
CLOCK_EVENT_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", pynvml.nvmlClocksEventReasonGpuIdle),
    ("applications_clocks_setting", pynvml.nvmlClocksEventReasonApplicationsClocksSetting),
    ("sw_power_cap", pynvml.nvmlClocksEventReasonSwPowerCap),
    ("hw_slowdown", pynvml.nvmlClocksEventReasonHwSlowdown),
    ("sync_boost", pynvml.nvmlClocksEventReasonSyncBoost),
    ("sw_thermal_slowdown", pynvml.nvmlClocksEventReasonSwThermalSlowdown),
    ("hw_thermal_slowdown", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
    ("hw_power_brake_slowdown", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown),
    ("display_clock_setting", pynvml.nvmlClocksEventReasonDisplayClockSetting),
)
_NVLINK_ERROR_COUNTERS = (
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
)


# --- errors -------------------------------------------------------------------------------


class NvmlCallError(FabricError):
    """An NVML call on a GPU failed for a reason other than 'not supported'."""

    def __init__(self, gpu: int, call: str, code: int, reason: str) -> None:
        super().__init__(f"GPU {gpu}: {call}: {reason}")
        self.gpu = gpu
        self.call = call
        self.code = code


class GpuLostError(NvmlCallError):
    """The GPU fell off the bus: NVML answers NVML_ERROR_GPU_IS_LOST to every call."""


def _call_error(gpu: int, call: str, exc: pynvml.NVMLError) -> NvmlCallError:
    code = int(exc.value)
    cls = GpuLostError if code == pynvml.NVML_ERROR_GPU_IS_LOST else NvmlCallError
    return cls(gpu, call, code, str(exc))


# --- what the collectors see ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static identity of a GPU, read once per NVML session."""

    index: int
    name: str
    uuid: str
    pci_bus_id: str
    driver_version: str
    link_count: int
    gpm_supported: bool


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A field value a collector needs every tick; per-link fields are read for every link
    (link index in scopeId)."""

    field_id: int
    per_link: bool = False


FieldValues = Mapping[tuple[int, int], int | float | None]
"""One tick's field values of a GPU by (field id, scope id); None where not supported."""


@dataclass(frozen=True, slots=True)
class GpmMetrics:
    """GPM metrics between two samples of consecutive ticks, in base units."""

    sm_occupancy_ratio: float | None
    tensor_active_ratio: float | None
    link_receive_bytes_per_s: tuple[float | None, ...]
    link_transmit_bytes_per_s: tuple[float | None, ...]


@dataclass(frozen=True, slots=True)
class LinkRemote:
    """What an NVLink connects to; fixed while the link keeps its state."""

    version: str | None
    remote_type: str | None
    remote_pci_bus_id: str | None


@dataclass(frozen=True, slots=True)
class LinkErrorCounts:
    """Cumulative data-link error counters of one NVLink (None where not supported)."""

    replay: int | None
    recovery: int | None
    crc_flit: int | None
    crc_data: int | None


@dataclass(frozen=True, slots=True)
class GpuEvents:
    """Critical events seen since the session started: XIDs by code, others by kind."""

    xids: tuple[tuple[int, int], ...]
    others: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Reading(Generic[T]):
    """One per-GPU NVML reading: the entry point it uses (for errors) and how to fetch it."""

    call: str
    fetch: Callable[[Any], T]


def _memory(handle: Any) -> tuple[int, int]:
    # v2 reports the driver's reservation apart, so `used` is what processes hold.
    info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    return int(info.used), int(info.total)


def _utilization(handle: Any) -> tuple[int, int]:
    rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
    return int(rates.gpu), int(rates.memory)


def _clock_event_reasons(handle: Any) -> int:
    try:
        return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    except pynvml.NVMLError_FunctionNotFound:
        # Drivers before R535 only have the older name for the same bitmask.
        return int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))


def _ecc(error_type: int, counter_type: int) -> Reading[int]:
    return Reading(
        "nvmlDeviceGetTotalEccErrors",
        lambda h: pynvml.nvmlDeviceGetTotalEccErrors(h, error_type, counter_type),
    )


UTILIZATION_PERCENT = Reading("nvmlDeviceGetUtilizationRates", _utilization)
MEMORY_USED_TOTAL_BYTES = Reading("nvmlDeviceGetMemoryInfo_v2", _memory)
POWER_MW: Reading[int] = Reading("nvmlDeviceGetPowerUsage", pynvml.nvmlDeviceGetPowerUsage)
POWER_LIMIT_MW: Reading[int] = Reading(
    "nvmlDeviceGetEnforcedPowerLimit", pynvml.nvmlDeviceGetEnforcedPowerLimit
)
ENERGY_MJ: Reading[int] = Reading(
    "nvmlDeviceGetTotalEnergyConsumption", pynvml.nvmlDeviceGetTotalEnergyConsumption
)
TEMPERATURE_GPU_C: Reading[int] = Reading(
    "nvmlDeviceGetTemperature",
    lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
)
SM_CLOCK_MHZ: Reading[int] = Reading(
    "nvmlDeviceGetClockInfo", lambda h: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
)
MEMORY_CLOCK_MHZ: Reading[int] = Reading(
    "nvmlDeviceGetClockInfo", lambda h: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)
)
PCIE_TX_KB_PER_S: Reading[int] = Reading(
    "nvmlDeviceGetPcieThroughput",
    lambda h: pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_TX_BYTES),
)
PCIE_RX_KB_PER_S: Reading[int] = Reading(
    "nvmlDeviceGetPcieThroughput",
    lambda h: pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES),
)
PCIE_REPLAYS: Reading[int] = Reading(
    "nvmlDeviceGetPcieReplayCounter", pynvml.nvmlDeviceGetPcieReplayCounter
)
ECC_CORRECTED_VOLATILE = _ecc(pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC)
ECC_UNCORRECTED_VOLATILE = _ecc(pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
ECC_CORRECTED_AGGREGATE = _ecc(pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC)
ECC_UNCORRECTED_AGGREGATE = _ecc(
    pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC
)
REMAPPED_ROWS: Reading[tuple[int, int, int, int]] = Reading(
    "nvmlDeviceGetRemappedRows", pynvml.nvmlDeviceGetRemappedRows
)
CLOCK_EVENT_REASONS_MASK = Reading("nvmlDeviceGetCurrentClocksEventReasons", _clock_event_reasons)


class Nvml(Protocol):
    """What the GPU and NVLink collectors need from NVML.

    Per-GPU methods raise GpuLostError when the GPU is lost and NvmlCallError for other
    unexpected failures; a value the GPU or driver does not support is None.
    """

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs; raises CollectorError while NVML is not available."""
        ...

    def register_fields(self, fields: Iterable[FieldSpec]) -> None:
        """Add fields to the batched per-tick field-value read."""
        ...

    def read(self, gpu: GpuInfo, reading: Reading[T]) -> T | None:
        """One reading of the GPU (the module's `Reading` constants)."""
        ...

    def fields(self, tick: Tick, gpu: GpuInfo) -> FieldValues:
        """This tick's registered field values, fetched once per GPU per tick."""
        ...

    def gpm(self, tick: Tick, gpu: GpuInfo) -> GpmMetrics | None:
        """GPM metrics since the previous tick's sample; None without GPM or a pair."""
        ...

    def link_remote(self, gpu: GpuInfo, link: int, up: bool | None) -> LinkRemote:
        """Cached remote-end info, read again when the link's state changes."""
        ...

    def link_errors(self, gpu: GpuInfo) -> tuple[LinkErrorCounts, ...]:
        """Error counters of every link, by link index."""
        ...

    def events(self, gpu: GpuInfo) -> GpuEvents:
        """Critical events counted so far by the background waiter."""
        ...


# --- the session over pynvml -----------------------------------------------------------------


class _FieldValue(ctypes.Structure):
    """nvmlFieldValue_t as pynvml lays it out, without pynvml's per-attribute conversion
    hook, which dominated the cost of decoding a GPU's ~70 field values every tick."""

    _fields_ = pynvml.c_nvmlFieldValue_t._fields_


class _GpmMetric(ctypes.Structure):
    _fields_ = pynvml.c_nvmlGpmMetric_t._fields_


class _GpmMetricsGet(ctypes.Structure):
    """nvmlGpmMetricsGet_t with plain-ctypes metrics, for the same reason as _FieldValue."""

    _fields_ = [
        (name, _GpmMetric * pynvml.NVML_GPM_METRIC_MAX if name == "metrics" else kind)
        for name, kind in pynvml.c_nvmlGpmMetricsGet_t._fields_
    ]


class _Unavailable(Exception):
    """NVML cannot be used now; the message says why."""


class _Slot:
    """One GPU's share of one tick: computed by the first collector to ask."""

    __slots__ = ("done", "error", "lock", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.value: Any = None
        self.error: NvmlCallError | None = None


class _Gpm:
    """A GPU's GPM state: two sample buffers, the one taken last, and a reusable request."""

    def __init__(self, links: int) -> None:
        self.previous: Any = None
        self.previous_s = 0.0
        self.samples = [pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()]
        self.links = min(links, _GPM_MAX_LINKS)
        ids = [pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL]
        ids += range(_GPM_NVLINK_L0_RX, _GPM_NVLINK_L0_RX + 2 * self.links)
        self.request = _GpmMetricsGet()
        self.request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        self.request.numMetrics = len(ids)
        for i, metric_id in enumerate(ids):
            self.request.metrics[i].metricId = metric_id

    def free(self) -> None:
        for sample in self.samples:
            pynvml.nvmlGpmSampleFree(sample)


class _Gpu:
    """Per-GPU private state: handle, lock for the reused ctypes buffers, caches."""

    def __init__(
        self, info: GpuInfo, handle: Any, unreachable: NvmlCallError | None = None
    ) -> None:
        self.info = info
        self._handle = handle
        # Why there is no handle: a GPU lost before start-up has none to sample through.
        self.unreachable = unreachable
        self.lock = threading.Lock()
        self.field_keys: list[tuple[int, int]] = []
        self.field_request: Any = None
        self.gpm: _Gpm | None = None
        self.remote: dict[int, tuple[bool | None, LinkRemote]] = {}
        self.xids: dict[int, int] = {}
        self.others: dict[str, int] = {}

    @property
    def handle(self) -> Any:
        if self.unreachable is not None:
            raise self.unreachable
        return self._handle


class NvmlSession:
    """`Nvml` over pynvml; one per process, shared by the collectors."""

    def __init__(
        self,
        library: Path | None = None,
        *,
        retry_interval_s: float = RETRY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._library = library
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._state_lock = threading.Lock()
        self._gpus: list[_Gpu] | None = None
        self._closed = False
        self._infos: tuple[GpuInfo, ...] = ()
        self._unavailable: str | None = None
        self._last_attempt_s: float | None = None
        self._field_specs: list[FieldSpec] = []
        self._tick_lock = threading.Lock()
        self._ticks: dict[int, dict[tuple[str, int], _Slot]] = {}
        self._events_lock = threading.Lock()
        self._event_set: Any = None
        self._waiter: threading.Thread | None = None
        self._stop = threading.Event()
        self._fields_fn: Any = None
        self._error_counter_fn: Any = None

    # --- lifecycle ---

    def gpus(self) -> tuple[GpuInfo, ...]:
        with self._state_lock:
            if self._closed:
                raise CollectorError("NVML session is closed")
            if self._gpus is None:
                self._try_open()
            if self._gpus is None:
                raise SourceUnavailableError(f"NVML not available: {self._unavailable}")
            return self._infos

    def _try_open(self) -> None:
        now = self._clock()
        if self._last_attempt_s is not None and (
            now - self._last_attempt_s < self._retry_interval_s
        ):
            return
        self._last_attempt_s = now
        try:
            self._open()
        except _Unavailable as exc:
            if self._unavailable is None:
                log.warning(
                    "NVML not available: %s (retrying every %.0f s)", exc, self._retry_interval_s
                )
            self._unavailable = str(exc)
            return
        if self._unavailable is not None:
            log.info("NVML available again: %d GPUs", len(self._infos))
        self._unavailable = None

    def _open(self) -> None:
        if self._library is not None:
            # Loaded first and global, pynvml's CDLL("libnvidia-ml.so.1") resolves to this
            # library by its SONAME instead of searching the loader path.
            try:
                ctypes.CDLL(str(self._library), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                reason = str(exc).removeprefix(f"{self._library}: ")
                raise _Unavailable(f"cannot load {self._library}: {reason}") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise _Unavailable(f"nvmlInit: {exc}") from None
        try:
            driver_version = str(pynvml.nvmlSystemGetDriverVersion())
            count = int(pynvml.nvmlDeviceGetCount())
            # The two per-tick hot paths (one field-value batch per GPU, 72 error counters
            # per GPU) call the entry points pynvml resolved, with reused ctypes buffers:
            # pynvml's wrappers rebuild structures and take a lock on every call.
            self._fields_fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
            self._error_counter_fn = pynvml._nvmlGetFunctionPointer(
                "nvmlDeviceGetNvLinkErrorCounter"
            )
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise _Unavailable(f"enumerating GPUs: {exc}") from None
        gpus = [_open_gpu(i, driver_version) for i in range(count)]
        self._gpus = gpus
        self._infos = tuple(g.info for g in gpus)
        self._start_waiter()

    def close(self) -> None:
        """Stop the event waiter, free NVML objects and shut NVML down."""
        with self._state_lock:
            self._closed = True
            gpus, self._gpus = self._gpus, None
            if gpus is None:
                return
            self._stop.set()
            if self._waiter is not None:
                self._waiter.join(timeout=EVENT_WAIT_MS / 1000 + 2.0)
                self._waiter = None
            with self._events_lock:
                if self._event_set is not None:
                    _quietly(pynvml.nvmlEventSetFree, self._event_set)
                    self._event_set = None
            for gpu in gpus:
                if gpu.gpm is not None:
                    _quietly(gpu.gpm.free)
            with self._tick_lock:
                self._ticks.clear()
            _quietly(pynvml.nvmlShutdown)

    def __enter__(self) -> NvmlSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gpu(self, info: GpuInfo) -> _Gpu:
        gpus = self._gpus
        if gpus is None:
            raise CollectorError("NVML session is closed")
        return gpus[info.index]

    # --- plain readings ---

    def read(self, gpu: GpuInfo, reading: Reading[T]) -> T | None:
        try:
            return reading.fetch(self._gpu(gpu).handle)
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise _call_error(gpu.index, reading.call, exc) from None

    # --- per-tick shared work ---

    def register_fields(self, fields: Iterable[FieldSpec]) -> None:
        with self._state_lock:
            added = [f for f in fields if f not in self._field_specs]
            self._field_specs.extend(added)
            if added and self._gpus is not None:
                for gpu in self._gpus:
                    with gpu.lock:
                        gpu.field_request = None

    def fields(self, tick: Tick, gpu: GpuInfo) -> FieldValues:
        values: FieldValues = self._once("fields", tick, gpu, lambda: self._fetch_fields(gpu))
        return values

    def gpm(self, tick: Tick, gpu: GpuInfo) -> GpmMetrics | None:
        if not gpu.gpm_supported:
            return None
        metrics: GpmMetrics | None = self._once(
            "gpm", tick, gpu, lambda: self._gpm_metrics(tick, gpu)
        )
        return metrics

    def _once(self, kind: str, tick: Tick, gpu: GpuInfo, compute: Callable[[], Any]) -> Any:
        with self._tick_lock:
            slots = self._ticks.get(tick.seq)
            if slots is None:
                # Keep the previous tick too: a slow collector may still be on it.
                self._ticks = {s: v for s, v in self._ticks.items() if s >= tick.seq - 1}
                slots = self._ticks[tick.seq] = {}
            slot = slots.get((kind, gpu.index))
            if slot is None:
                slot = slots[(kind, gpu.index)] = _Slot()
        with slot.lock:
            if not slot.done:
                try:
                    slot.value = compute()
                except NvmlCallError as exc:
                    slot.error = exc
                slot.done = True
        if slot.error is not None:
            raise slot.error
        return slot.value

    def _fetch_fields(self, info: GpuInfo) -> FieldValues:
        gpu = self._gpu(info)
        with gpu.lock:
            if gpu.field_request is None:
                keys = [
                    (spec.field_id, link)
                    for spec in self._field_specs
                    for link in (range(info.link_count) if spec.per_link else (0,))
                ]
                request = (_FieldValue * len(keys))()
                for entry, (field_id, scope) in zip(request, keys, strict=True):
                    entry.fieldId = field_id
                    entry.scopeId = scope
                gpu.field_keys, gpu.field_request = keys, request
            keys, request = gpu.field_keys, gpu.field_request
            if not keys:
                return {}
            # The array is built once per GPU and reused: pynvml's wrapper would rebuild it
            # field by field on every call.
            ret = self._fields_fn(gpu.handle, ctypes.c_int32(len(keys)), request)
            if ret != pynvml.NVML_SUCCESS:
                raise _call_error(info.index, "nvmlDeviceGetFieldValues", pynvml.NVMLError(ret))
            values: dict[tuple[int, int], int | float | None] = {}
            for key, entry in zip(keys, request, strict=True):
                if entry.nvmlReturn == pynvml.NVML_SUCCESS:
                    values[key] = getattr(entry.value, _VALUE_MEMBERS[entry.valueType])
                else:
                    values[key] = None
            return values

    def _gpm_metrics(self, tick: Tick, info: GpuInfo) -> GpmMetrics | None:
        gpu = self._gpu(info)
        with gpu.lock:
            call = "nvmlGpmSampleAlloc"
            try:
                if gpu.gpm is None:
                    gpu.gpm = _Gpm(info.link_count)
                state = gpu.gpm
                if (
                    state.previous is not None
                    and tick.monotonic_s - state.previous_s < GPM_MIN_INTERVAL_S
                ):
                    # Too close to pair: keep the older sample as the base for the next tick.
                    return None
                first, second = state.samples
                current = second if state.previous is first else first
                call = "nvmlGpmSampleGet"
                pynvml.nvmlGpmSampleGet(gpu.handle, current)
                previous = state.previous
                state.previous, state.previous_s = current, tick.monotonic_s
                if previous is None:
                    return None
                request = state.request
                request.sample1, request.sample2 = previous, current
                call = "nvmlGpmMetricsGet"
                pynvml.nvmlGpmMetricsGet(request)
            except pynvml.NVMLError as exc:
                if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    return None
                raise _call_error(info.index, call, exc) from None
            values = [
                m.value if m.nvmlReturn == pynvml.NVML_SUCCESS else None
                for m in request.metrics[: request.numMetrics]
            ]
        occupancy, tensor, links = values[0], values[1], values[2:]
        return GpmMetrics(
            sm_occupancy_ratio=None if occupancy is None else occupancy / 100.0,
            tensor_active_ratio=None if tensor is None else tensor / 100.0,
            link_receive_bytes_per_s=tuple(None if v is None else v * _MIB for v in links[0::2]),
            link_transmit_bytes_per_s=tuple(None if v is None else v * _MIB for v in links[1::2]),
        )

    # --- NVLink ---

    def link_remote(self, gpu: GpuInfo, link: int, up: bool | None) -> LinkRemote:
        state = self._gpu(gpu)
        cached = state.remote.get(link)
        if cached is not None and cached[0] == up:
            return cached[1]
        handle = state.handle
        version = self._optional(gpu, lambda: pynvml.nvmlDeviceGetNvLinkVersion(handle, link))
        kind = self._optional(gpu, lambda: pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link))
        pci = self._optional(
            gpu, lambda: pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId
        )
        remote = LinkRemote(
            version=None if version is None else _NVLINK_VERSIONS.get(version, str(version)),
            remote_type=None if kind is None else _REMOTE_TYPES.get(kind, "unknown"),
            remote_pci_bus_id=None if pci is None else _text(pci),
        )
        state.remote[link] = (up, remote)
        return remote

    @staticmethod
    def _optional(gpu: GpuInfo, call: Callable[[], Any]) -> Any:
        # Remote-end details are descriptive: any failure but a lost GPU leaves them unknown.
        try:
            return call()
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _call_error(gpu.index, "nvmlDeviceGetNvLink*", exc) from None
            return None

    def link_errors(self, gpu: GpuInfo) -> tuple[LinkErrorCounts, ...]:
        handle = self._gpu(gpu).handle
        fn = self._error_counter_fn
        out = ctypes.c_ulonglong()
        ref = ctypes.byref(out)
        counts: list[LinkErrorCounts] = []
        # 4 counters x 18 links x 8 GPUs is the agent's largest call volume: call the C
        # entry point directly with one reused output instead of through pynvml's wrapper.
        for link in range(gpu.link_count):
            values: list[int | None] = []
            for counter in _NVLINK_ERROR_COUNTERS:
                ret = fn(handle, link, counter, ref)
                if ret == pynvml.NVML_SUCCESS:
                    values.append(out.value)
                elif ret == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    values.append(None)
                else:
                    raise _call_error(
                        gpu.index, "nvmlDeviceGetNvLinkErrorCounter", pynvml.NVMLError(ret)
                    )
            counts.append(LinkErrorCounts(*values))
        return tuple(counts)

    # --- events ---

    def events(self, gpu: GpuInfo) -> GpuEvents:
        state = self._gpu(gpu)
        with self._events_lock:
            return GpuEvents(
                xids=tuple(sorted(state.xids.items())), others=tuple(sorted(state.others.items()))
            )

    def _start_waiter(self) -> None:
        assert self._gpus is not None
        try:
            event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            log.warning("NVML events unavailable, XIDs will not be counted: %s", exc)
            return
        by_address: dict[int | None, _Gpu] = {}
        wanted = pynvml.nvmlEventTypeXidCriticalError
        for mask in _CRITICAL_EVENTS:
            wanted |= mask
        for gpu in self._gpus:
            if gpu.unreachable is not None:
                continue
            try:
                supported = pynvml.nvmlDeviceGetSupportedEventTypes(gpu.handle)
                if supported & wanted:
                    pynvml.nvmlDeviceRegisterEvents(gpu.handle, supported & wanted, event_set)
                    by_address[ctypes.cast(gpu.handle, ctypes.c_void_p).value] = gpu
            except pynvml.NVMLError as exc:
                log.warning("GPU %d: no critical-event notifications: %s", gpu.info.index, exc)
        self._event_set = event_set
        self._stop = threading.Event()
        self._waiter = threading.Thread(
            target=self._wait_events,
            args=(event_set, by_address, self._stop),
            name="nvml-events",
            daemon=True,
        )
        self._waiter.start()

    def _wait_events(
        self, event_set: Any, by_address: dict[int | None, _Gpu], stop: threading.Event
    ) -> None:
        failing: str | None = None
        while not stop.is_set():
            try:
                data = pynvml.nvmlEventSetWait_v2(event_set, EVENT_WAIT_MS)
            except pynvml.NVMLError as exc:
                if exc.value == pynvml.NVML_ERROR_TIMEOUT or stop.is_set():
                    continue
                if failing != str(exc):
                    log.warning("waiting for NVML events: %s", exc)
                    failing = str(exc)
                stop.wait(1.0)
                continue
            if failing is not None:
                log.info("waiting for NVML events works again")
                failing = None
            gpu = by_address.get(ctypes.cast(data.device, ctypes.c_void_p).value)
            if gpu is None:
                continue
            with self._events_lock:
                if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                    xid = int(data.eventData)
                    gpu.xids[xid] = gpu.xids.get(xid, 0) + 1
                for mask, kind in _CRITICAL_EVENTS.items():
                    if data.eventType & mask:
                        gpu.others[kind] = gpu.others.get(kind, 0) + 1


def _open_gpu(index: int, driver_version: str) -> _Gpu:
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError as exc:
        # nvidia-smi's "Unable to determine the device handle": typically a GPU lost
        # before the agent started. Keep its index so it is reported, not skipped.
        log.warning("GPU %d: no device handle: %s", index, exc)
        info = GpuInfo(index, "", "", "", driver_version, link_count=0, gpm_supported=False)
        return _Gpu(info, None, _call_error(index, "nvmlDeviceGetHandleByIndex_v2", exc))
    return _Gpu(_identify(index, handle, driver_version), handle)


def _identify(index: int, handle: Any, driver_version: str) -> GpuInfo:
    """Static identity; parts a GPU cannot tell (lost at start-up) stay empty."""

    def get(call: Callable[[], Any], default: Any) -> Any:
        try:
            return call()
        except pynvml.NVMLError:
            return default

    links = get(lambda: pynvml.nvmlDeviceGetFieldValues(handle, [FI_NVLINK_LINK_COUNT])[0], None)
    gpm = get(lambda: pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice, 0)
    return GpuInfo(
        index=index,
        name=_text(get(lambda: pynvml.nvmlDeviceGetName(handle), "")),
        uuid=_text(get(lambda: pynvml.nvmlDeviceGetUUID(handle), "")),
        pci_bus_id=_text(get(lambda: pynvml.nvmlDeviceGetPciInfo_v3(handle).busId, "")),
        driver_version=driver_version,
        link_count=(
            int(links.value.uiVal)
            if links is not None and links.nvmlReturn == pynvml.NVML_SUCCESS
            else 0
        ),
        gpm_supported=bool(gpm),
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _quietly(call: Callable[..., Any], *args: Any) -> None:
    # Teardown: the driver may already be gone; nothing useful can be done about it here.
    try:
        call(*args)
    except pynvml.NVMLError as exc:
        log.debug("NVML teardown: %s", exc)


# Where the process's NVML session lives in the shared resources.
NVML_KEY = "nvml"


@dataclass(frozen=True, slots=True)
class NvmlOptions:
    """What the GPU and NVLink collectors take from the configuration."""

    # libnvidia-ml.so.1 when it is not on the loader path (also the test driver).
    nvml_library: Path | None


def shared_session(context: CollectorContext[NvmlOptions]) -> NvmlSession:
    """The process's NVML session, created by the first collector that needs it."""
    return context.shared.get(
        NVML_KEY, lambda: NvmlSession(context.options.nvml_library), NvmlSession.close
    )
