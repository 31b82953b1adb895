"""GPU telemetry from NVML: one `GpuSample` per GPU per tick, the `gpu` section.

A lost GPU is reported as lost with its identity while the others keep being sampled; a
value the GPU does not support is None and not exported. Other NVML failures are recorded
in the GPU's sample, and the collector fails only when every GPU failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from agent.common import rates
from agent.node import nvml
from agent.node.collectors.base import (
    CollectorContext,
    Section,
    SnapshotField,
    SummaryClock,
    Tick,
    register,
    sample_message,
)
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.nvml import (
    FieldSpec,
    GpuInfo,
    GpuLostError,
    Nvml,
    NvmlCallError,
    NvmlOptions,
    Reading,
)
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_pb2

T = TypeVar("T")

_FIELDS = (FieldSpec(nvml.FI_MEMORY_TEMP),)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one tick, in base units. None: not supported or not read."""

    index: int
    name: str
    uuid: str
    pci_bus_id: str
    driver_version: str
    lost: bool = False
    error: str | None = None
    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    temperature_gpu_celsius: int | None = None
    temperature_memory_celsius: int | None = None
    sm_clock_hz: int | None = None
    memory_clock_hz: int | None = None
    pcie_transmit_bytes_per_second: int | None = None
    pcie_receive_bytes_per_second: int | None = None
    pcie_replays: int | None = None
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    # Bitmask of NVML clock-event (throttle) reasons; see agent.node.nvml.CLOCK_EVENT_REASONS.
    clock_event_reasons: int | None = None
    sm_occupancy_ratio: float | None = None
    tensor_active_ratio: float | None = None
    # Cumulative since the agent started: (xid, count) and (event kind, count).
    xid_errors: tuple[tuple[int, int], ...] = ()
    critical_events: tuple[tuple[str, int], ...] = ()


def gpu_message(sample: GpuSample) -> telemetry_pb2.GpuSample:
    return sample_message(
        telemetry_pb2.GpuSample,
        sample,
        xid_errors=[telemetry_pb2.XidCount(xid=xid, count=n) for xid, n in sample.xid_errors],
    )


class GpuSummarizer:
    """Each GPU's state in the fleet summary, and the XIDs it raised since the previous
    one."""

    def __init__(self) -> None:
        # By index and UUID: a different board in the same slot starts afresh.
        self._xids: dict[tuple[int, str], tuple[tuple[int, int], ...]] = {}

    def summarize(
        self, samples: tuple[GpuSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        xids: dict[tuple[int, str], tuple[tuple[int, int], ...]] = {}
        for sample in samples:
            key = (sample.index, sample.uuid)
            xids[key] = sample.xid_errors
            message = summary.gpus.add(index=sample.index, uuid=sample.uuid, lost=sample.lost)
            if sample.utilization_gpu_ratio is not None:
                message.utilization_ratio = sample.utilization_gpu_ratio
            if sample.power_watts is not None:
                message.power_watts = sample.power_watts
            before = self._xids.get(key)
            # Equal tuples, the usual case, raised nothing: skip building the lookup.
            if before is not None and before != sample.xid_errors:
                previous = dict(before)
                for xid, count in sample.xid_errors:
                    # An XID this GPU had not raised before counts fully.
                    raised = rates.increase(count, previous.get(xid, 0))
                    if raised:
                        message.new_xids.add(xid=xid, count=raised)
        self._xids = xids


GPU = Section(
    "gpu",
    GpuSample,
    snapshot_field=SnapshotField("gpus", telemetry_pb2.GpuSample, gpu_message),
    summarizer=GpuSummarizer,
)


class GpuCollector:
    name = "gpu"
    sections = (GPU,)

    def __init__(self, source: Nvml) -> None:
        self._nvml = source
        source.register_fields(_FIELDS)

    def collect(self, tick: Tick) -> tuple[GpuSample, ...]:
        results = [self._sample(tick, gpu) for gpu in self._nvml.gpus()]
        failures = [failure for _, failure in results if failure is not None]
        if failures and len(failures) == len(results):
            raise CollectorError("every GPU failed: " + "; ".join(failures))
        return tuple(sample for sample, _ in results)

    def _sample(self, tick: Tick, gpu: GpuInfo) -> tuple[GpuSample, str | None]:
        """The GPU's sample, and why it failed when not one of its readings answered."""
        source = self._nvml
        errors: list[str] = []
        answered = 0

        def attempt(call: Callable[[], T]) -> T | None:
            try:
                return call()
            except GpuLostError:
                raise
            except NvmlCallError as exc:
                errors.append(str(exc))
                return None

        def read(reading: Reading[T]) -> T | None:
            nonlocal answered
            try:
                value = source.read(gpu, reading)
            except GpuLostError:
                raise
            except NvmlCallError as exc:
                errors.append(str(exc))
                return None
            answered += 1
            return value

        events = source.events(gpu)
        try:
            utilization = read(nvml.UTILIZATION_PERCENT)
            memory = read(nvml.MEMORY_USED_TOTAL_BYTES)
            power_mw = read(nvml.POWER_MW)
            limit_mw = read(nvml.POWER_LIMIT_MW)
            energy_mj = read(nvml.ENERGY_MJ)
            temperature = read(nvml.TEMPERATURE_GPU_C)
            sm_mhz = read(nvml.SM_CLOCK_MHZ)
            memory_mhz = read(nvml.MEMORY_CLOCK_MHZ)
            pcie_tx = read(nvml.PCIE_TX_KB_PER_S)
            pcie_rx = read(nvml.PCIE_RX_KB_PER_S)
            replays = read(nvml.PCIE_REPLAYS)
            ecc = (
                read(nvml.ECC_CORRECTED_VOLATILE),
                read(nvml.ECC_UNCORRECTED_VOLATILE),
                read(nvml.ECC_CORRECTED_AGGREGATE),
                read(nvml.ECC_UNCORRECTED_AGGREGATE),
            )
            remapped = read(nvml.REMAPPED_ROWS)
            reasons = read(nvml.CLOCK_EVENT_REASONS_MASK)
            fields = attempt(lambda: source.fields(tick, gpu))
            memory_temperature = fields.get((nvml.FI_MEMORY_TEMP, 0)) if fields else None
            gpm = attempt(lambda: source.gpm(tick, gpu))
        except GpuLostError:
            lost = GpuSample(
                index=gpu.index,
                name=gpu.name,
                uuid=gpu.uuid,
                pci_bus_id=gpu.pci_bus_id,
                driver_version=gpu.driver_version,
                lost=True,
                xid_errors=events.xids,
                critical_events=events.others,
            )
            return lost, None
        sample = GpuSample(
            index=gpu.index,
            name=gpu.name,
            uuid=gpu.uuid,
            pci_bus_id=gpu.pci_bus_id,
            driver_version=gpu.driver_version,
            error="; ".join(errors) if errors else None,
            utilization_gpu_ratio=None if utilization is None else utilization[0] / 100.0,
            utilization_memory_ratio=None if utilization is None else utilization[1] / 100.0,
            memory_used_bytes=None if memory is None else memory[0],
            memory_total_bytes=None if memory is None else memory[1],
            power_watts=None if power_mw is None else power_mw / 1000.0,
            power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
            energy_joules=None if energy_mj is None else energy_mj / 1000.0,
            temperature_gpu_celsius=temperature,
            temperature_memory_celsius=(
                None if memory_temperature is None else int(memory_temperature)
            ),
            sm_clock_hz=None if sm_mhz is None else sm_mhz * 1_000_000,
            memory_clock_hz=None if memory_mhz is None else memory_mhz * 1_000_000,
            # NVML's PCIe throughput is in KB of 1024 bytes.
            pcie_transmit_bytes_per_second=None if pcie_tx is None else pcie_tx * 1024,
            pcie_receive_bytes_per_second=None if pcie_rx is None else pcie_rx * 1024,
            pcie_replays=replays,
            ecc_corrected_volatile=ecc[0],
            ecc_uncorrected_volatile=ecc[1],
            ecc_corrected_aggregate=ecc[2],
            ecc_uncorrected_aggregate=ecc[3],
            remapped_rows_correctable=None if remapped is None else remapped[0],
            remapped_rows_uncorrectable=None if remapped is None else remapped[1],
            remapped_rows_pending=None if remapped is None else bool(remapped[2]),
            remapped_rows_failure=None if remapped is None else bool(remapped[3]),
            clock_event_reasons=reasons,
            sm_occupancy_ratio=None if gpm is None else gpm.sm_occupancy_ratio,
            tensor_active_ratio=None if gpm is None else gpm.tensor_active_ratio,
            xid_errors=events.xids,
            critical_events=events.others,
        )
        return sample, (errors[0] if errors and not answered else None)

    def metrics(self, samples: Sequence[GpuSample]) -> Iterable[Family]:
        return render(samples)

    def close(self) -> None:
        """The NVML session is shared; SharedResources closes it."""


def render(samples: Sequence[GpuSample]) -> list[Family]:
    gpu = ["gpu"]
    info = GaugeFamily(
        "fabric_gpu_info",
        "GPU identity (value 1).",
        labels=["gpu", "uuid", "name", "pci_bus_id", "driver_version"],
    )
    lost = GaugeFamily("fabric_gpu_lost", "1 when the GPU fell off the bus.", labels=gpu)
    util = GaugeFamily(
        "fabric_gpu_utilization_ratio",
        "Fraction of the last sample period a kernel was running.",
        labels=gpu,
    )
    mem_util = GaugeFamily(
        "fabric_gpu_memory_utilization_ratio",
        "Fraction of the last sample period device memory was read or written.",
        labels=gpu,
    )
    mem_used = GaugeFamily(
        "fabric_gpu_memory_used_bytes", "Device memory allocated by processes.", labels=gpu
    )
    mem_total = GaugeFamily("fabric_gpu_memory_total_bytes", "Installed device memory.", labels=gpu)
    power = GaugeFamily("fabric_gpu_power_watts", "Board power draw.", labels=gpu)
    power_limit = GaugeFamily(
        "fabric_gpu_power_limit_watts", "Enforced board power limit.", labels=gpu
    )
    energy = CounterFamily(
        "fabric_gpu_energy_joules_total",
        "Energy consumed since the driver was loaded.",
        labels=gpu,
    )
    temperature = GaugeFamily(
        "fabric_gpu_temperature_celsius", "GPU die and HBM temperature.", labels=["gpu", "sensor"]
    )
    clock = GaugeFamily(
        "fabric_gpu_clock_hertz", "Current SM and memory clocks.", labels=["gpu", "clock"]
    )
    pcie_tx = GaugeFamily(
        "fabric_gpu_pcie_transmit_bytes_per_second", "PCIe transmit throughput.", labels=gpu
    )
    pcie_rx = GaugeFamily(
        "fabric_gpu_pcie_receive_bytes_per_second", "PCIe receive throughput.", labels=gpu
    )
    replays = CounterFamily("fabric_gpu_pcie_replays_total", "PCIe replay events.", labels=gpu)
    ecc = CounterFamily(
        "fabric_gpu_ecc_errors_total",
        "Memory ECC errors; volatile since the driver was loaded, aggregate over the board's life.",
        labels=["gpu", "type", "scope"],
    )
    remapped = GaugeFamily(
        "fabric_gpu_remapped_rows",
        "Remapped memory rows by cause, and 1 when a remap is pending or has failed.",
        labels=["gpu", "kind"],
    )
    throttle = GaugeFamily(
        "fabric_gpu_throttle_reason",
        "1 while this reason holds the clocks below their maximum.",
        labels=["gpu", "reason"],
    )
    occupancy = GaugeFamily(
        "fabric_gpu_sm_occupancy_ratio",
        "Resident warps over the maximum, between the last two ticks (GPM).",
        labels=gpu,
    )
    tensor = GaugeFamily(
        "fabric_gpu_tensor_active_ratio",
        "Fraction of cycles any tensor pipe was active, between the last two ticks (GPM).",
        labels=gpu,
    )
    xids = CounterFamily(
        "fabric_gpu_xid_errors_total",
        "XID errors reported by the driver since the agent started.",
        labels=["gpu", "xid"],
    )
    events = CounterFamily(
        "fabric_gpu_critical_events_total",
        "Other critical NVML events since the agent started.",
        labels=["gpu", "event"],
    )

    def gauge(family: GaugeFamily | CounterFamily, labels: list[str], value: float | None) -> None:
        if value is not None:
            family.add_metric(labels, value)

    for s in samples:
        g = str(s.index)
        info.add_metric([g, s.uuid, s.name, s.pci_bus_id, s.driver_version], 1)
        lost.add_metric([g], 1 if s.lost else 0)
        for xid, count in s.xid_errors:
            xids.add_metric([g, str(xid)], count)
        for kind, count in s.critical_events:
            events.add_metric([g, kind], count)
        if s.lost:
            continue
        labels = [g]
        gauge(util, labels, s.utilization_gpu_ratio)
        gauge(mem_util, labels, s.utilization_memory_ratio)
        gauge(mem_used, labels, s.memory_used_bytes)
        gauge(mem_total, labels, s.memory_total_bytes)
        gauge(power, labels, s.power_watts)
        gauge(power_limit, labels, s.power_limit_watts)
        gauge(energy, labels, s.energy_joules)
        gauge(temperature, [g, "gpu"], s.temperature_gpu_celsius)
        gauge(temperature, [g, "memory"], s.temperature_memory_celsius)
        gauge(clock, [g, "sm"], s.sm_clock_hz)
        gauge(clock, [g, "memory"], s.memory_clock_hz)
        gauge(pcie_tx, labels, s.pcie_transmit_bytes_per_second)
        gauge(pcie_rx, labels, s.pcie_receive_bytes_per_second)
        gauge(replays, labels, s.pcie_replays)
        gauge(ecc, [g, "corrected", "volatile"], s.ecc_corrected_volatile)
        gauge(ecc, [g, "uncorrected", "volatile"], s.ecc_uncorrected_volatile)
        gauge(ecc, [g, "corrected", "aggregate"], s.ecc_corrected_aggregate)
        gauge(ecc, [g, "uncorrected", "aggregate"], s.ecc_uncorrected_aggregate)
        gauge(remapped, [g, "correctable"], s.remapped_rows_correctable)
        gauge(remapped, [g, "uncorrectable"], s.remapped_rows_uncorrectable)
        gauge(remapped, [g, "pending"], s.remapped_rows_pending)
        gauge(remapped, [g, "failure"], s.remapped_rows_failure)
        if s.clock_event_reasons is not None:
            for reason, bit in nvml.CLOCK_EVENT_REASONS:
                throttle.add_metric([g, reason], 1 if s.clock_event_reasons & bit else 0)
        gauge(occupancy, labels, s.sm_occupancy_ratio)
        gauge(tensor, labels, s.tensor_active_ratio)
    families: list[Family] = [info, lost, util, mem_util, mem_used, mem_total, power]
    families += [power_limit, energy, temperature, clock, pcie_tx, pcie_rx, replays, ecc]
    families += [remapped, throttle, occupancy, tensor, xids, events]
    return families


# Configurations from before the collector was named after its section say `nvml`.
@register(GpuCollector, options=NvmlOptions, former_names=("nvml",))
def create(context: CollectorContext[NvmlOptions]) -> GpuCollector:
    return GpuCollector(nvml.shared_session(context))
