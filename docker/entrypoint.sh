#!/bin/sh
# Entry point of the KOALA images: runs the command it is given (`koala serve`, `ray start ...`, ...).
#
# With JOIN_RAY_CLUSTER=true (the API container), `koala serve` first joins the Ray cluster in RAY_ADDRESS as a node
# with no CPUs and no GPUs: every job's driver is a Ray driver, and a Ray driver must run on a node of the cluster it
# uses. No trial is scheduled on that node; it only hosts the drivers. Other commands (`koala token create`, ...)
# run without joining.
set -eu
if [ "${JOIN_RAY_CLUSTER:-false}" = "true" ] && [ "${1:-}" = "koala" ] && [ "${2:-}" = "serve" ]; then
    : "${RAY_ADDRESS:?JOIN_RAY_CLUSTER=true needs RAY_ADDRESS (host:port of the Ray head)}"
    ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats
fi
exec "$@"
