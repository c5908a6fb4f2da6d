"""Container HEALTHCHECK: one grpc.health.v1 Check against the local gateway.

Usage: python healthcheck.py [host:port] [service]. Defaults: 127.0.0.1:$ADAPTGATE_PORT (50051)
and the overall server status (""). Exit 0 when SERVING, 1 otherwise (NOT_SERVING while it
drains, unreachable, timed out), printing the status either way.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('ADAPTGATE_PORT', '50051')}"
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as exc:
        print(f"{target}: unhealthy ({exc.code().name}: {exc.details()})")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
