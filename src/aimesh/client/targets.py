"""Where the client's channels go: one address, or several replicas that calls are spread over.

gRPC's own ``round_robin`` policy does the spreading: a channel to the ``ipv4:`` (or ``ipv6:``) target of several
addresses keeps a connection to each and sends each call to the next ready one, so a replica that is down is
skipped until it answers again. The same policy on one DNS name spreads calls over every address it resolves to
(a compose service with replicas, a headless Service).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

# Every channel of the client: with one address that resolves to one server it behaves as pick_first does.
ROUND_ROBIN: tuple[tuple[str, str], ...] = (("grpc.lb_policy_name", "round_robin"),)
# Target schemes gRPC resolves itself (a bare ``name:port`` is a DNS name).
_SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:")


def grpc_target(addresses: str | Sequence[str]) -> str:
    """The channel target for ``addresses``: ``host:port`` strings, as a list or comma separated. One address (or
    any target gRPC parses, such as ``dns:///name:port``) is returned as it is; several must be IP addresses of one
    family (``127.0.0.1:50051`` or ``[::1]:50051``), as gRPC's ``ipv4:``/``ipv6:`` targets list them. Raises
    ValueError otherwise."""
    if isinstance(addresses, str) and addresses.strip().startswith(_SCHEMES):
        return addresses.strip()  # a target already, commas and all (``ipv4:a:1,b:2``)
    parts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    listed = [part.strip() for part in parts if part.strip()]
    if not listed:
        raise ValueError("no address given")
    if len(listed) == 1:
        return listed[0]
    families = {_ip_family(address) for address in listed}
    if len(families) > 1:
        raise ValueError(f"several addresses must all be IPv4 or all IPv6: {', '.join(listed)}")
    return f"{families.pop()}:{','.join(listed)}"


def _ip_family(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(
            f"{address!r}: several addresses must be IP addresses (gRPC resolves no list of names); give one "
            "DNS name that resolves to every replica instead"
        ) from None
    if ip.version == 6 and not host.startswith("["):
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, [{host}]:{port}")
    return f"ipv{ip.version}"
