#!/bin/sh
# Container entrypoint (PID 1 is tini). For `adaptgate serve` with RAY_ADDRESS=<host>:<port>
# (a Ray cluster's GCS, e.g. KubeRay's <cluster>-head-svc:6379), Ray needs a raylet on this host
# before a driver can connect: join the cluster as a node with no CPUs and no GPUs, so no
# training task is ever scheduled here, then run the server. Ray Client addresses (ray://...)
# are not joined, but note the training runner streams progress with Ray generator tasks,
# which Ray Client does not support: point RAY_ADDRESS at the GCS port.
# Every other command (KubeRay's own `ray start`, a shell) runs unchanged.
set -eu

if [ "${1:-}" = "adaptgate" ] && [ "${2:-}" = "serve" ] && [ -n "${RAY_ADDRESS:-}" ]; then
  case "$RAY_ADDRESS" in
    ray://*|auto|local) ;;
    *)
      echo "entrypoint: joining the Ray cluster at $RAY_ADDRESS as a node with no resources" >&2
      attempt=1
      until ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 \
              --object-store-memory="${RAY_OBJECT_STORE_BYTES:-100000000}" --disable-usage-stats; do
        if [ "$attempt" -ge "${RAY_JOIN_ATTEMPTS:-10}" ]; then
          echo "entrypoint: could not join the Ray cluster at $RAY_ADDRESS after $attempt attempts" >&2
          exit 1
        fi
        attempt=$((attempt + 1))
        sleep 5
      done
      ;;
  esac
fi

exec "$@"
