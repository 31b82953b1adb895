"""QoS policy files: the `QosPolicy` model, loading from YAML, and the checks around it.

A policy owns one (interface, direction) and divides its `bandwidth` between classes
(HTB semantics: `rate` guaranteed, `ceil` borrowable, `priority` orders borrowing).
Checks come in three layers, each reporting `PolicyViolation(file, path, reason)` with
the field path as the YAML spells it (`spec.classes[1].ceil`):

- the model itself: types, ranges, formats and the rules within one policy;
- `check_ownership`: across policies, no shared (interface, direction), unique names;
- `check_host`: against a host, through injectable probes (interfaces, cgroup root).

Regenerate the published schema with `python -m agent.common.policy.model --write-schema
policies/schema.json`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from agent.common.errors import FabricError
from agent.common.files import FileTooLarge, NotRegularFile, read_regular
from agent.common.policy.bounded import (
    YamlLimitError,
    field_path,
    load_yaml_documents,
    shape_problem,
)
from agent.common.policy.limits import (
    MAX_DOCUMENT_BYTES,
    MAX_IFNAME_BYTES,
    MAX_RATE_BPS,
    MAX_U32_FILTERS_PER_CLASS,
    MAX_U32_FILTERS_PER_POLICY,
    format_bytes,
    ifb_name,
    ifname_bytes,
    u32_filters_of,
)
from agent.common.policy.units import PortRange, Rate, format_bps, parse_rate

API_VERSION = "fabric.qos/v1alpha1"
KIND = "QosPolicy"
# One HTB tree per policy; 64 classes is far beyond any node's real traffic mix and keeps
# the minor-handle and nftables-set budgets small.
MAX_CLASSES = 64
MAX_PRIORITY = 7
SCHEMA_ID = "urn:fabric-agent:schema:qos-policy:v1alpha1"
SCHEMA_PATH = Path(__file__).resolve().parents[3] / "policies" / "schema.json"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORTS = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_FWMARK = re.compile(r"^0x([0-9a-fA-F]{1,8})/0x([0-9a-fA-F]{1,8})$")
# A whole mark in decimal text: how a message's string field carries a YAML integer.
_FWMARK_NUMBER = re.compile(r"^[0-9]{1,10}$")
# Linux IFNAMSIZ is 16 including the terminating NUL.
# What the kernel allows for a cgroup's name and path (NAME_MAX, PATH_MAX).
NAME_MAX, MAX_CGROUP_PATH = 255, 4095
# nft matches a cgroup by a quoted path: a quote or a control character cannot be in it.
_CGROUP_UNQUOTABLE = re.compile(r'["\x00-\x1f\x7f]')
# '"' too: nft names the interface in a quoted string, which cannot hold one.
_IFNAME = re.compile(r'^[^\s/:"]{1,15}$')


# --- field types -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fwmark:
    """Packet mark match: `mark & mask == value`."""

    value: int
    mask: int = 0xFFFFFFFF

    def __str__(self) -> str:
        return f"0x{self.value:x}/0x{self.mask:x}"


def _dns_label(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a name (a string is required)")
    if not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


def _interface_name(value: object) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value) or value in {".", ".."}:
        raise ValueError(
            f"{value!r} is not an interface name (1-15 characters, no spaces, '/', ':' or '\"')"
        )
    # The kernel counts bytes: 15 characters of UTF-8 can be 60.
    size = ifname_bytes(value)
    if size > MAX_IFNAME_BYTES:
        raise ValueError(
            f"{value!r} is {size} bytes in UTF-8; the kernel allows at most {MAX_IFNAME_BYTES}"
        )
    return value


def _absolute_rate(value: object) -> Rate:
    return parse_rate(value, allow_percent=False)


def _any_rate(value: object) -> Rate:
    return parse_rate(value, allow_percent=True)


def parse_port_range(value: object) -> PortRange:
    """`2049`, `"2049"` or `"29500-29599"` -> PortRange; ports are 1..65535, ranges ordered."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'{value!r} is not a port or port range (use "N" or "N-M")')
    if isinstance(value, int):
        first = last = value
    else:
        match = _PORTS.match(value)
        if match is None:
            raise ValueError(f'{value!r} is not a port or port range (use "N" or "N-M")')
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"{value!r}: port {port} is outside 1..65535")
    if first > last:
        raise ValueError(f"{value!r}: range start {first} is after its end {last}")
    return PortRange(first, last)


def _cidr(value: object) -> IpNetwork:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r} is not a CIDR (use e.g. 10.20.0.0/16 or fd00::/64)")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            network = ipaddress.ip_network(value, strict=False)
            raise ValueError(f"{value!r} has host bits set (did you mean {network}?)") from None
        raise ValueError(f"{value!r} is not a CIDR (use e.g. 10.20.0.0/16 or fd00::/64)") from None


def _cgroup_path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a cgroup path")
    if value.startswith("/"):
        raise ValueError(f"{value!r}: cgroup paths are relative to the cgroup2 root, no leading /")
    if len(value) > MAX_CGROUP_PATH:
        raise ValueError(f"cgroup path of {len(value)} characters: at most {MAX_CGROUP_PATH}")
    if _CGROUP_UNQUOTABLE.search(value):
        raise ValueError(f"{value!r}: a '\"' or a control character cannot be matched by nft")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError(f"{value!r}: '..' is not allowed in a cgroup path")
    if any(part in {"", "."} for part in parts):
        raise ValueError(f"{value!r}: empty or '.' path component")
    if any(len(part) > NAME_MAX for part in parts):
        raise ValueError(f"{value!r}: a path component over {NAME_MAX} characters")
    return value


def _fwmark(value: object) -> Fwmark:
    if isinstance(value, str) and _FWMARK_NUMBER.match(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{value!r}: a mark is a 32-bit unsigned integer")
        return Fwmark(value)
    if isinstance(value, str):
        match = _FWMARK.match(value)
        if match:
            mark, mask = int(match.group(1), 16), int(match.group(2), 16)
            if mark & ~mask:
                raise ValueError(f"{value!r}: the value has bits outside the mask, never matches")
            return Fwmark(mark, mask)
    raise ValueError(f'{value!r} is not a mark (use an integer or "0xVALUE/0xMASK")')


_RATE_PATTERN = r"^\d+(\.\d+)?(bit|kbit|Mbit|Gbit|Tbit)?$"

DnsLabel = Annotated[
    str,
    PlainValidator(_dns_label),
    WithJsonSchema(
        {"type": "string", "pattern": _DNS_LABEL.pattern, "maxLength": 63},
    ),
]
InterfaceName = Annotated[
    str,
    PlainValidator(_interface_name),
    WithJsonSchema({"type": "string", "pattern": _IFNAME.pattern}),
]
Bandwidth = Annotated[
    Rate,
    PlainValidator(_absolute_rate),
    PlainSerializer(str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_RATE_BPS},
                {"type": "string", "pattern": _RATE_PATTERN},
            ],
            "description": "bits per second, or a number with bit/kbit/Mbit/Gbit/Tbit",
        }
    ),
]
ClassRate = Annotated[
    Rate,
    PlainValidator(_any_rate),
    PlainSerializer(str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_RATE_BPS},
                {"type": "string", "pattern": _RATE_PATTERN},
                {"type": "string", "pattern": r"^\d+(\.\d+)?%$"},
            ],
            "description": "bits per second, a number with bit/kbit/Mbit/Gbit/Tbit, "
            "or a percentage of spec.bandwidth",
        }
    ),
]
Ports = Annotated[
    PortRange,
    PlainValidator(parse_port_range),
    PlainSerializer(str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": _PORTS.pattern},
            ],
            "description": 'a port "N" or an inclusive range "N-M", 1..65535',
        }
    ),
]
Cidr = Annotated[
    IpNetwork,
    PlainValidator(_cidr),
    PlainSerializer(str),
    WithJsonSchema({"type": "string", "description": "IPv4 or IPv6 network in CIDR notation"}),
]
CgroupPath = Annotated[
    str,
    PlainValidator(_cgroup_path),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r'^[^/"\x00-\x1f\x7f][^"\x00-\x1f\x7f]*$',
            "maxLength": MAX_CGROUP_PATH,
            "description": "cgroup v2 path relative to the cgroup2 root, no '..', no "
            "component over 255 characters",
        }
    ),
]
Mark = Annotated[
    Fwmark,
    PlainValidator(_fwmark),
    PlainSerializer(str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF},
                {"type": "string", "pattern": _FWMARK_NUMBER.pattern},
                {"type": "string", "pattern": _FWMARK.pattern},
            ]
        }
    ),
]
Dscp = Annotated[int, Field(strict=True, ge=0, le=63)]


# --- the model -------------------------------------------------------------------------


class _PolicyModel(BaseModel):
    # YAML spells fields in camelCase; Python code may use the snake_case names.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        field_title_generator=lambda name, _info: to_camel(name),
    )


class Match(_PolicyModel):
    """One match entry: every key set must match (AND). A class's entries are OR-ed."""

    src_cidr: Cidr | None = None
    dst_cidr: Cidr | None = None
    src_ports: tuple[Ports, ...] | None = Field(default=None, min_length=1)
    dst_ports: tuple[Ports, ...] | None = Field(default=None, min_length=1)
    protocol: Literal["tcp", "udp", "icmp"] | None = None
    dscp: Dscp | None = None
    cgroup: CgroupPath | None = None
    fwmark: Mark | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("empty match entry matches nothing; give at least one key")
        return self


class TrafficClass(_PolicyModel):
    """A share of the bandwidth: guaranteed `rate`, borrowable up to `ceil`."""

    name: DnsLabel
    # 0 (first) .. 7 (last) to receive spare bandwidth.
    priority: int = Field(strict=True, ge=0, le=MAX_PRIORITY)
    rate: ClassRate
    # Defaults to the policy's bandwidth: a class may borrow everything that is idle.
    ceil: ClassRate | None = None
    # Remark packets of this class with this DSCP; None leaves DSCP alone.
    dscp: Dscp | None = None
    match: tuple[Match, ...] = ()


class PolicySpec(_PolicyModel):
    """One interface and direction, its bandwidth, and the classes that share it."""

    interface: InterfaceName
    # Ingress is shaped on an IFB device the agent creates and redirects to.
    direction: Literal["egress", "ingress"]
    bandwidth: Bandwidth
    default_class: DnsLabel
    # Replace a root qdisc the agent did not create; off so a hand-made tree survives.
    take_over: bool = Field(default=False, strict=True)
    classes: tuple[TrafficClass, ...] = Field(min_length=1, max_length=MAX_CLASSES)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = list(_spec_problems(self))
        if problems:
            raise _SpecProblems(problems)
        return self

    @property
    def bandwidth_bps(self) -> int:
        return self.bandwidth.resolve(0)

    def effective_classes(self) -> tuple[EffectiveClass, ...]:
        bandwidth = self.bandwidth_bps
        return tuple(
            EffectiveClass(
                name=c.name,
                priority=c.priority,
                rate_bps=c.rate.resolve(bandwidth),
                ceil_bps=bandwidth if c.ceil is None else c.ceil.resolve(bandwidth),
                dscp=c.dscp,
                match=c.match,
                is_default=c.name == self.default_class,
            )
            for c in self.classes
        )


class PolicyMetadata(_PolicyModel):
    """Identifies the policy; names are unique across a node's policies."""

    name: DnsLabel


class QosPolicy(_PolicyModel):
    """A `fabric.qos/v1alpha1` `QosPolicy` document."""

    model_config = ConfigDict(title="QosPolicy")

    api_version: Literal["fabric.qos/v1alpha1"]
    kind: Literal["QosPolicy"]
    metadata: PolicyMetadata
    spec: PolicySpec

    def effective_classes(self) -> tuple[EffectiveClass, ...]:
        """Per-class values after defaults: what a backend compiles from."""
        return self.spec.effective_classes()


@dataclass(frozen=True)
class EffectiveClass:
    """A class with defaults applied: ceil defaulted to bandwidth, percentages in bps."""

    name: str
    priority: int
    rate_bps: int
    ceil_bps: int
    dscp: int | None
    match: tuple[Match, ...]
    is_default: bool


class _SpecProblems(ValueError):
    """Rules across fields of one spec, each with its path relative to the spec."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))
        self.problems = tuple(problems)


def _spec_problems(spec: PolicySpec) -> Iterable[tuple[str, str]]:
    bandwidth = spec.bandwidth_bps
    shown = str(spec.bandwidth)
    first_index: dict[str, int] = {}
    total = 0
    for i, cls in enumerate(spec.classes):
        where = f"classes[{i}]"
        if cls.name in first_index:
            yield (
                f"{where}.name",
                f"duplicate class name {cls.name!r} (also classes[{first_index[cls.name]}])",
            )
        else:
            first_index[cls.name] = i
        rate = cls.rate.resolve(bandwidth)
        total += rate
        if rate <= 0:
            yield f"{where}.rate", f"{cls.rate} of bandwidth {shown} is less than 1bit"
        ceil = bandwidth
        if cls.ceil is not None:
            ceil = cls.ceil.resolve(bandwidth)
            if ceil > bandwidth:
                yield f"{where}.ceil", f"{cls.ceil} exceeds bandwidth {shown}"
            elif ceil <= 0:
                yield f"{where}.ceil", f"{cls.ceil} of bandwidth {shown} is less than 1bit"
        if rate > bandwidth:
            yield f"{where}.rate", f"{cls.rate} exceeds bandwidth {shown}"
        elif cls.ceil is not None and rate > ceil:
            yield f"{where}.rate", f"{cls.rate} exceeds ceil {cls.ceil}"
        yield from _match_problems(cls.match, f"{where}.match")
    # A class over the bandwidth on its own is the problem to report, not the sum.
    if total > bandwidth and all(c.rate.resolve(bandwidth) <= bandwidth for c in spec.classes):
        yield "classes", f"class rates add up to {format_bps(total)}, more than bandwidth {shown}"
    if spec.default_class not in first_index:
        yield "defaultClass", f"no class named {spec.default_class!r}"
    yield from _expansion_problems(spec)


def _expansion_problems(spec: PolicySpec) -> Iterable[tuple[str, str]]:
    """Kernel objects the spec expands to, beyond what a node should hold."""
    if spec.direction == "ingress":
        device = ifb_name(spec.interface)
        if ifname_bytes(device) > MAX_IFNAME_BYTES:
            reason = (
                f"its IFB device {device!r} is {ifname_bytes(device)} bytes; "
                f"the kernel allows at most {MAX_IFNAME_BYTES}"
            )
            yield "interface", reason
    total = 0
    for i, cls in enumerate(spec.classes):
        count = u32_filters_of(cls.match).filters
        total += count
        if count > MAX_U32_FILTERS_PER_CLASS:
            yield (
                f"classes[{i}].match",
                f"expands to {count} u32 filters; a class may have at most "
                f"{MAX_U32_FILTERS_PER_CLASS}",
            )
    if total > MAX_U32_FILTERS_PER_POLICY:
        yield (
            "classes",
            f"the match entries expand to {total} u32 filters; a policy may have at most "
            f"{MAX_U32_FILTERS_PER_POLICY}",
        )


def _match_problems(entries: Sequence[Match], where: str) -> Iterable[tuple[str, str]]:
    """Keys of one match entry that can never match together."""
    for j, entry in enumerate(entries):
        if entry.protocol == "icmp":
            for key, ports in (("srcPorts", entry.src_ports), ("dstPorts", entry.dst_ports)):
                if ports is not None:
                    yield f"{where}[{j}].{key}", "ports never match protocol icmp"
        if (
            entry.src_cidr is not None
            and entry.dst_cidr is not None
            and entry.src_cidr.version != entry.dst_cidr.version
        ):
            yield f"{where}[{j}].dstCidr", "mixes IPv4 and IPv6 with srcCidr"


# --- assignments -----------------------------------------------------------------------


class AssignmentSpec(_PolicyModel):
    """More traffic for a class of an existing policy."""

    policy: DnsLabel
    class_name: DnsLabel
    match: tuple[Match, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = list(_match_problems(self.match, "match"))
        count = u32_filters_of(self.match).filters
        if count > MAX_U32_FILTERS_PER_CLASS:
            reason = (
                f"expands to {count} u32 filters; a class may have at most "
                f"{MAX_U32_FILTERS_PER_CLASS}"
            )
            problems.append(("match", reason))
        if problems:
            raise _SpecProblems(problems)
        return self


class QosAssignment(_PolicyModel):
    """A `fabric.qos/v1alpha1` `QosAssignment`: its match entries join class
    `spec.className` of policy `spec.policy`, which keeps its interface, rates and
    other matches. Orchestrators give one job's cgroup a class this way; many
    assignments share one policy, each applied, leased and removed on its own."""

    model_config = ConfigDict(title="QosAssignment")

    api_version: Literal["fabric.qos/v1alpha1"]
    kind: Literal["QosAssignment"]
    metadata: PolicyMetadata
    spec: AssignmentSpec


PolicyObject = QosPolicy | QosAssignment
OBJECT_KINDS: dict[str, type[QosPolicy] | type[QosAssignment]] = {
    "QosPolicy": QosPolicy,
    "QosAssignment": QosAssignment,
}


def parse_document(document: object, source: str, *, number: int | None = None) -> PolicyObject:
    """A policy or assignment document (YAML names) as its model: the one parse of every
    way in (files, fabricctl, the agent's and the aggregator's APIs). Raises PolicyError
    whose violations name `source` (and the document `number` in a file of several), and
    each field path."""

    def refused(path: str, reason: str) -> PolicyError:
        return PolicyError([PolicyViolation(source, path, reason, document=number)])

    problem = shape_problem(document)
    if problem is not None:
        raise refused(*problem)
    if not isinstance(document, Mapping):
        raise refused("", f"a policy must be a mapping, got {type(document).__name__}")
    if "kind" not in document:
        raise refused("kind", "required field is missing")
    kind = document["kind"]
    model = OBJECT_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise refused("kind", f"must be {' or '.join(OBJECT_KINDS)}, got {kind!r}")
    try:
        # Documents use the YAML names only; Python names are for code (populate_by_name).
        return model.model_validate(dict(document), by_alias=True, by_name=False)
    except ValidationError as exc:
        raise PolicyError(
            [
                PolicyViolation(source, path, reason, document=number)
                for path, reason in _translate(exc)
            ]
        ) from None


# --- violations and loading ------------------------------------------------------------


@dataclass(frozen=True)
class PolicyViolation:
    """One problem: the file, the field path (YAML names) and why.

    `document` is the 1-based YAML document, set only in files holding several;
    `line`/`column` (1-based) are set for YAML syntax errors.
    """

    file: str
    path: str
    reason: str
    document: int | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        if self.document is not None:
            where += f" (document {self.document})"
        if self.path:
            return f"{where}: {self.path}: {self.reason}"
        return f"{where}: {self.reason}"


class PolicyError(FabricError):
    """Policies are invalid; `violations` lists every problem found."""

    def __init__(self, violations: Sequence[PolicyViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("\n".join(str(v) for v in self.violations))


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy with where it came from, for messages that name the file."""

    file: str
    document: int | None
    policy: QosPolicy

    def violation(self, path: str, reason: str) -> PolicyViolation:
        return PolicyViolation(self.file, path, reason, document=self.document)


def load_policies(text: str, file: str) -> list[LoadedPolicy]:
    """Every policy in `text` (documents separated by `---`); raises PolicyError."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise PolicyError([PolicyViolation(file, "", _too_large(size))])
    try:
        documents = list(load_yaml_documents(text))
    except YamlLimitError as exc:
        violation = PolicyViolation(
            file, exc.path, exc.reason, line=exc.mark.line + 1, column=exc.mark.column + 1
        )
        raise PolicyError([violation]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = f"not valid YAML: {exc.problem or exc.context}"
        if mark is None:
            raise PolicyError([PolicyViolation(file, "", reason)]) from None
        violation = PolicyViolation(file, "", reason, line=mark.line + 1, column=mark.column + 1)
        raise PolicyError([violation]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([PolicyViolation(file, "", f"not valid YAML: {exc}")]) from None
    several = sum(doc is not None for doc in documents) > 1
    loaded: list[LoadedPolicy] = []
    violations: list[PolicyViolation] = []
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue
        number = index if several else None
        try:
            policy = parse_document(document, file, number=number)
        except PolicyError as exc:
            violations.extend(exc.violations)
            continue
        if not isinstance(policy, QosPolicy):
            reason = (
                f"a {policy.kind} is applied through the API (fabricctl policy apply), not a file"
            )
            violations.append(PolicyViolation(file, "kind", reason, document=number))
            continue
        loaded.append(LoadedPolicy(file, number, policy))
    if not loaded and not violations:
        violations.append(PolicyViolation(file, "", "holds no policy"))
    if violations:
        raise PolicyError(violations)
    return loaded


def read_policy_text(path: Path) -> str:
    """The text of a policy file; raises PolicyError naming the file. Only a regular file
    is opened (a FIFO would block the reader), and no more of it is read than the limit."""

    def refused(reason: str) -> PolicyError:
        return PolicyError([PolicyViolation(str(path), "", reason)])

    try:
        data = read_regular(path, MAX_DOCUMENT_BYTES)
        return data.decode()
    except NotRegularFile:
        raise refused("cannot read: not a regular file") from None
    except FileTooLarge as exc:
        raise refused(_too_large(exc.size or 0, more=exc.size is None)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise refused(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def _too_large(size: int, *, more: bool = False) -> str:
    shown = f"more than {format_bytes(MAX_DOCUMENT_BYTES)}" if more else format_bytes(size)
    return f"document of {shown}; at most {format_bytes(MAX_DOCUMENT_BYTES)}"


def load_policy_file(path: Path) -> list[LoadedPolicy]:
    """Every policy in the file at `path`; raises PolicyError naming the file."""
    return load_policies(read_policy_text(path), str(path))


def _translate(exc: ValidationError) -> Iterable[tuple[str, str]]:
    errors = exc.errors()
    for error in errors:
        loc = error["loc"]
        # pydantic counts only the items that validated: a list whose every item failed
        # is also reported as too short. The items' own errors say what is wrong.
        if error["type"] == "too_short" and any(
            len(other["loc"]) > len(loc) and other["loc"][: len(loc)] == loc for other in errors
        ):
            continue
        path = field_path(loc)
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _SpecProblems):
            for relative, reason in cause.problems:
                yield f"{path}.{relative}" if path else relative, reason
            continue
        kind = error["type"]
        if kind == "extra_forbidden":
            reason = "unknown field"
        elif kind == "missing":
            reason = "required field is missing"
        elif kind == "value_error":
            reason = error["msg"].removeprefix("Value error, ")
        elif isinstance(error["input"], dict | list):
            reason = error["msg"]
        else:
            reason = f"{error['msg']}, got {error['input']!r}"
        yield path, reason


# --- checks beyond one policy ----------------------------------------------------------


def check_ownership(policies: Sequence[LoadedPolicy]) -> list[PolicyViolation]:
    """Two policies never own the same (interface, direction); names are unique."""
    violations: list[PolicyViolation] = []
    owners: dict[tuple[str, str], LoadedPolicy] = {}
    names: dict[str, LoadedPolicy] = {}
    for loaded in policies:
        spec, name = loaded.policy.spec, loaded.policy.metadata.name
        key = (spec.interface, spec.direction)
        if key in owners:
            other = owners[key]
            reason = (
                f"{spec.interface} {spec.direction} is already owned by policy "
                f"{other.policy.metadata.name!r} in {_where(other)}"
            )
            violations.append(loaded.violation("spec.interface", reason))
        else:
            owners[key] = loaded
        if name in names:
            reason = f"policy name {name!r} is also used in {_where(names[name])}"
            violations.append(loaded.violation("metadata.name", reason))
        else:
            names[name] = loaded
    return violations


def _where(loaded: LoadedPolicy) -> str:
    if loaded.document is None:
        return loaded.file
    return f"{loaded.file} (document {loaded.document})"


# A file's text and what it parsed to, by path.
ParseCache = dict[str, tuple[str, "list[LoadedPolicy] | PolicyError"]]


def load_policy_files(
    paths: Sequence[Path], cache: ParseCache | None = None
) -> tuple[list[LoadedPolicy], list[PolicyViolation]]:
    """Every policy in the files, and every violation, ownership across the files included.

    `cache` keeps each file's parse from the last call while its text stays the same: the
    daemon reads its directory every pass, and parsing a large policy (YAML, then the
    model) is otherwise most of a pass that changes nothing. Updated in place."""
    loaded: list[LoadedPolicy] = []
    violations: list[PolicyViolation] = []
    parsed: ParseCache = {}
    for path in paths:
        try:
            text = read_policy_text(path)
        except PolicyError as exc:
            violations.extend(exc.violations)
            continue
        entry = cache.get(str(path)) if cache is not None else None
        if entry is None or entry[0] != text:
            try:
                entry = (text, load_policies(text, str(path)))
            except PolicyError as exc:
                entry = (text, exc)
        parsed[str(path)] = entry
        if isinstance(entry[1], PolicyError):
            violations.extend(entry[1].violations)
        else:
            loaded.extend(entry[1])
    if cache is not None:
        cache.clear()
        cache.update(parsed)
    violations.extend(check_ownership(loaded))
    return loaded, violations


def check_host(
    policies: Sequence[LoadedPolicy],
    *,
    interface_exists: Callable[[str], bool],
    cgroup_root: Path | None,
) -> list[PolicyViolation]:
    """Interfaces and cgroups the policies name exist on this host.

    `cgroup_root` is the cgroup2 mount (None: not mounted). The cgroup must exist now:
    nftables resolves the path to an id when the rule is loaded.
    """
    violations: list[PolicyViolation] = []
    for loaded in policies:
        spec = loaded.policy.spec
        if not interface_exists(spec.interface):
            reason = f"unknown interface {spec.interface!r} on this host"
            violations.append(loaded.violation("spec.interface", reason))
        for i, cls in enumerate(spec.classes):
            for j, entry in enumerate(cls.match):
                if entry.cgroup is None:
                    continue
                path = f"spec.classes[{i}].match[{j}].cgroup"
                if cgroup_root is None:
                    reason = f"cgroup not found: {entry.cgroup} (cgroup v2 is not mounted)"
                    violations.append(loaded.violation(path, reason))
                elif not cgroup_exists(cgroup_root, entry.cgroup):
                    reason = f"cgroup not found: {cgroup_root / entry.cgroup}"
                    violations.append(loaded.violation(path, reason))
    return violations


def cgroup_exists(cgroup_root: Path, cgroup: str) -> bool:
    """Whether `cgroup` is a directory under `cgroup_root`; a path the file system cannot
    look up (too long, no permission) is not one: it cannot be matched either."""
    try:
        return (cgroup_root / cgroup).is_dir()
    except OSError:
        return False


def interface_exists(name: str) -> bool:
    """Whether this network namespace has an interface called `name`."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def detect_cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """The cgroup2 mount point (/sys/fs/cgroup, or .../unified on hybrid hosts), or None."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if tail.split()[:1] == ["cgroup2"] and len(parts) >= 5:
            # mountinfo escapes space, tab, newline and backslash as octal.
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4]))
    return None


# --- JSON Schema -----------------------------------------------------------------------


def policy_json_schema() -> dict[str, Any]:
    """The published JSON Schema of a policy document (YAML names)."""
    schema = QosPolicy.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "QosPolicy",
        "description": "A fabric-agent QoS policy (fabric.qos/v1alpha1): bandwidth classes "
        "on one interface and direction.",
    }


def render_schema() -> str:
    return json.dumps(policy_json_schema(), indent=2) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> None:
    path.write_text(render_schema())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="QoS policy model utilities")
    parser.add_argument("--write-schema", type=Path, metavar="PATH", required=True)
    write_schema(parser.parse_args().write_schema)
