"""NVLink telemetry from NVML: one `NvLinkSample` per link of every GPU per tick.

Payload byte counters, link state and speed come from the GPU's one batched field-value
read of the tick (shared with the GPU collector). Error counters come from
nvmlDeviceGetNvLinkErrorCounter: on Hopper the legacy per-link error fields read zero.
Links of a lost GPU are left out; the collector fails only when every GPU failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.node import nvml
from agent.node.collectors.base import CollectorContext, Tick, register
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.nvml import FieldSpec, GpuInfo, GpuLostError, LinkErrorCounts, Nvml, NvmlCallError

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


class NvLinkCollector:
    name = "nvlink"

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


@register("nvlink")
def create(context: CollectorContext) -> NvLinkCollector:
    return NvLinkCollector(nvml.shared_session(context))
