"""gRPC health check over TLS, for the Kubernetes probes of ingest and the notifier.

The kubelet's own gRPC probe speaks plaintext only, and a server with AIMESH_TLS_CERT_FILE refuses plaintext. This
runs in the service's container (the image has grpcio and grpcio-health-checking): it asks grpc.health.v1 for the
overall status and exits 0 for SERVING, 1 otherwise. The server certificate is checked against --ca-file and
--server-name (the probe dials 127.0.0.1, which the certificate need not name); --cert-file and --key-file present
a client certificate, for servers that ask for one (mutual TLS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("--ca-file", required=True, type=Path, help="PEM bundle that signed the server certificate")
    parser.add_argument("--server-name", required=True, help="a name in the server certificate")
    parser.add_argument("--cert-file", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key-file", type=Path, help="PEM key of the client certificate")
    parser.add_argument("--timeout-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca_file.read_bytes(),
        private_key=args.key_file.read_bytes() if args.key_file else None,
        certificate_chain=args.cert_file.read_bytes() if args.cert_file else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)]
    with grpc.secure_channel(args.target, credentials, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout_s)
        except grpc.RpcError as e:
            print(f"health check of {args.target} failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
