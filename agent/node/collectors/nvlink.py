"""NVLink telemetry from NVML: one `NvLinkSample` per link of every GPU per tick, the
`nvlink` section.

Payload byte counters, link state and speed come from the GPU's one batched field-value
read of the tick (shared with the GPU collector). Error counters come from
nvmlDeviceGetNvLinkErrorCounter: on Hopper the legacy per-link error fields read zero.
Links of a lost GPU are left out; the collector fails only when every GPU failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.common import rates
from agent.node import nvml
from agent.node.collectors.base import (
    CollectorContext,
    Section,
    SnapshotField,
    SummaryClock,
    Tick,
    register,
)
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.nvml import (
    FieldSpec,
    GpuInfo,
    GpuLostError,
    LinkErrorCounts,
    Nvml,
    NvmlCallError,
    NvmlOptions,
)
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_pb2

_FIELDS = (
    FieldSpec(nvml.FI_NVLINK_TX_KIB, per_link=True),
    FieldSpec(nvml.FI_NVLINK_RX_KIB, per_link=True),
    FieldSpec(nvml.FI_NVLINK_SPEED_MBPS, per_link=True),
    FieldSpec(nvml.FI_NVLINK_STATE, per_link=True),
)
_NO_ERRORS = LinkErrorCounts(None, None, None, None)


@dataclass(frozen=True, slots=True)
class NvLinkSample:
    """One NVLink at one tick, in base units. None: not supported or not read."""

    gpu: int
    link: int
    up: bool | None
    version: str | None
    remote_type: str | None
    remote_pci_bus_id: str | None
    speed_bytes_per_second: int | None
    # Cumulative payload (no protocol overhead).
    transmit_bytes: int | None
    receive_bytes: int | None
    replay_errors: int | None
    recovery_errors: int | None
    crc_flit_errors: int | None
    crc_data_errors: int | None
    # Rates between the last two ticks measured by GPM.
    gpm_transmit_bytes_per_second: float | None = None
    gpm_receive_bytes_per_second: float | None = None
    error: str | None = None


@dataclass(slots=True)
class _LinkTotals:
    """One GPU's NVLinks summed over a summary's interval."""

    transmit_bytes_per_second: float = 0.0
    receive_bytes_per_second: float = 0.0
    links: int = 0
    down: list[int] = field(default_factory=list)
    errors: int = 0
    # (link, errors) of the links with errors this interval.
    erring: list[tuple[int, int]] = field(default_factory=list)


class NvLinkSummarizer:
    """Each GPU's NVLinks summed into the GPU's entry of the fleet summary: rates, links
    down, and errors since the previous summary. The GPU section's summarizer makes the
    entries, so this one runs after it; links of a GPU without an entry (the GPU collector
    failed) are counted for the next summary but not reported."""

    def __init__(self) -> None:
        self._at_s: float | None = None
        # (gpu, link) -> transmit bytes, receive bytes, errors
        self._counters: dict[tuple[int, int], tuple[int | None, int | None, int | None]] = {}

    def summarize(
        self, samples: tuple[NvLinkSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        elapsed_s = clock.elapsed_s(self._at_s)
        counters: dict[tuple[int, int], tuple[int | None, int | None, int | None]] = {}
        totals: dict[int, _LinkTotals] = {}
        for sample in samples:
            key = (sample.gpu, sample.link)
            errors = _link_errors(sample)
            now = (sample.transmit_bytes, sample.receive_bytes, errors)
            before = self._counters.get(key)
            counters[key] = now
            gpu = totals.get(sample.gpu)
            if gpu is None:
                gpu = totals[sample.gpu] = _LinkTotals()
            gpu.links += 1
            if sample.up is False:
                gpu.down.append(sample.link)
            gpu.transmit_bytes_per_second += _link_rate(
                sample.gpm_transmit_bytes_per_second,
                now[0],
                None if before is None else before[0],
                elapsed_s,
            )
            gpu.receive_bytes_per_second += _link_rate(
                sample.gpm_receive_bytes_per_second,
                now[1],
                None if before is None else before[1],
                elapsed_s,
            )
            if errors is not None and before is not None:
                increase = rates.increase(errors, before[2])
                if increase:
                    gpu.errors += increase
                    gpu.erring.append((sample.link, increase))
        self._at_s = clock.completed_wall_s
        self._counters = counters
        for message in summary.gpus:
            found = totals.get(message.index)
            if found is None:
                continue
            message.nvlink_transmit_bytes_per_second = found.transmit_bytes_per_second
            message.nvlink_receive_bytes_per_second = found.receive_bytes_per_second
            message.nvlink_links = found.links
            message.nvlink_links_down.extend(found.down)
            message.nvlink_errors = found.errors
            for link, errors in found.erring:
                message.nvlink_link_errors.add(link=link, errors=errors)


def _link_errors(sample: NvLinkSample) -> int | None:
    """Replay, recovery and CRC errors together; None when the link reports none of them."""
    counts = (
        sample.replay_errors,
        sample.recovery_errors,
        sample.crc_flit_errors,
        sample.crc_data_errors,
    )
    if all(count is None for count in counts):
        return None
    return sum(count for count in counts if count is not None)


def _link_rate(
    measured: float | None, now: int | None, before: int | None, elapsed_s: float
) -> float:
    """A link's bytes/s: GPM's own measurement where the GPU has one (it is exact over its
    window); otherwise the counter's increase, 0 until a link has two readings."""
    if measured is not None:
        return measured
    if now is None:
        return 0.0
    return rates.rate(now, before, elapsed_s) or 0.0


NVLINK = Section(
    "nvlink",
    NvLinkSample,
    snapshot_field=SnapshotField("nvlinks", telemetry_pb2.NvLinkSample),
    summarizer=NvLinkSummarizer,
    summarize_after=("gpu",),
)


class NvLinkCollector:
    name = "nvlink"
    sections = (NVLINK,)

    def __init__(self, source: Nvml) -> None:
        self._nvml = source
        source.register_fields(_FIELDS)

    def collect(self, tick: Tick) -> tuple[NvLinkSample, ...]:
        samples: list[NvLinkSample] = []
        failures: list[str] = []
        present = 0
        for gpu in self._nvml.gpus():
            try:
                links, failure = self._links(tick, gpu)
            except GpuLostError:
                continue
            present += 1
            if failure is not None:
                failures.append(failure)
            samples.extend(links)
        if present and len(failures) == present:
            raise CollectorError("every GPU failed: " + "; ".join(failures))
        return tuple(samples)

    def _links(self, tick: Tick, gpu: GpuInfo) -> tuple[list[NvLinkSample], str | None]:
        """The GPU's link samples, and why there are none when its field values failed.
        Error counters or GPM failing leave those values None and the error in the samples."""
        source = self._nvml
        try:
            fields = source.fields(tick, gpu)
        except GpuLostError:
            raise
        except NvmlCallError as exc:
            return [], str(exc)
        errors: list[str] = []
        try:
            counters: Sequence[LinkErrorCounts] = source.link_errors(gpu)
        except GpuLostError:
            raise
        except NvmlCallError as exc:
            counters = ()
            errors.append(str(exc))
        try:
            gpm = source.gpm(tick, gpu)
        except GpuLostError:
            raise
        except NvmlCallError as exc:
            gpm = None
            errors.append(str(exc))
        error = "; ".join(errors) if errors else None
        gpm_tx = gpm.link_transmit_bytes_per_s if gpm is not None else ()
        gpm_rx = gpm.link_receive_bytes_per_s if gpm is not None else ()
        links = []
        for link in range(gpu.link_count):
            state = fields.get((nvml.FI_NVLINK_STATE, link))
            up = None if state is None else state == nvml.NVLINK_STATE_ACTIVE
            remote = source.link_remote(gpu, link, up)
            tx_kib = fields.get((nvml.FI_NVLINK_TX_KIB, link))
            rx_kib = fields.get((nvml.FI_NVLINK_RX_KIB, link))
            speed_mbps = fields.get((nvml.FI_NVLINK_SPEED_MBPS, link))
            errs = counters[link] if link < len(counters) else _NO_ERRORS
            links.append(
                NvLinkSample(
                    gpu=gpu.index,
                    link=link,
                    up=up,
                    version=remote.version,
                    remote_type=remote.remote_type,
                    remote_pci_bus_id=remote.remote_pci_bus_id,
                    # NVML reports link speed in MB/s of 10^6 bytes.
                    speed_bytes_per_second=None
                    if speed_mbps is None
                    else int(speed_mbps) * 1_000_000,
                    transmit_bytes=None if tx_kib is None else int(tx_kib) * 1024,
                    receive_bytes=None if rx_kib is None else int(rx_kib) * 1024,
                    replay_errors=errs.replay,
                    recovery_errors=errs.recovery,
                    crc_flit_errors=errs.crc_flit,
                    crc_data_errors=errs.crc_data,
                    gpm_transmit_bytes_per_second=gpm_tx[link] if link < len(gpm_tx) else None,
                    gpm_receive_bytes_per_second=gpm_rx[link] if link < len(gpm_rx) else None,
                    error=error,
                )
            )
        return links, None

    def metrics(self, samples: Sequence[NvLinkSample]) -> Iterable[Family]:
        return render(samples)

    def close(self) -> None:
        """The NVML session is shared; SharedResources closes it."""


def render(samples: Sequence[NvLinkSample]) -> list[Family]:
    link = ["gpu", "link"]
    info = GaugeFamily(
        "fabric_nvlink_info",
        "NVLink version and remote end (value 1).",
        labels=["gpu", "link", "version", "remote_type", "remote_pci_bus_id"],
    )
    up = GaugeFamily("fabric_nvlink_up", "1 when the link is active.", labels=link)
    speed = GaugeFamily(
        "fabric_nvlink_speed_bytes_per_second", "Link speed per direction.", labels=link
    )
    tx = CounterFamily(
        "fabric_nvlink_transmit_bytes_total", "Payload bytes transmitted.", labels=link
    )
    rx = CounterFamily("fabric_nvlink_receive_bytes_total", "Payload bytes received.", labels=link)
    errors = CounterFamily(
        "fabric_nvlink_errors_total",
        "Data-link errors by type (replay, recovery, crc_flit, crc_data).",
        labels=["gpu", "link", "type"],
    )
    gpm_tx = GaugeFamily(
        "fabric_nvlink_gpm_transmit_bytes_per_second",
        "Transmit rate between the last two ticks (GPM).",
        labels=link,
    )
    gpm_rx = GaugeFamily(
        "fabric_nvlink_gpm_receive_bytes_per_second",
        "Receive rate between the last two ticks (GPM).",
        labels=link,
    )
    for s in samples:
        labels = [str(s.gpu), str(s.link)]
        info.add_metric(
            [*labels, s.version or "", s.remote_type or "", s.remote_pci_bus_id or ""], 1
        )
        if s.up is not None:
            up.add_metric(labels, 1 if s.up else 0)
        if s.speed_bytes_per_second is not None:
            speed.add_metric(labels, s.speed_bytes_per_second)
        if s.transmit_bytes is not None:
            tx.add_metric(labels, s.transmit_bytes)
        if s.receive_bytes is not None:
            rx.add_metric(labels, s.receive_bytes)
        for kind, count in (
            ("replay", s.replay_errors),
            ("recovery", s.recovery_errors),
            ("crc_flit", s.crc_flit_errors),
            ("crc_data", s.crc_data_errors),
        ):
            if count is not None:
                errors.add_metric([*labels, kind], count)
        if s.gpm_transmit_bytes_per_second is not None:
            gpm_tx.add_metric(labels, s.gpm_transmit_bytes_per_second)
        if s.gpm_receive_bytes_per_second is not None:
            gpm_rx.add_metric(labels, s.gpm_receive_bytes_per_second)
    return [info, up, speed, tx, rx, errors, gpm_tx, gpm_rx]


@register(NvLinkCollector, options=NvmlOptions)
def create(context: CollectorContext[NvmlOptions]) -> NvLinkCollector:
    return NvLinkCollector(nvml.shared_session(context))
