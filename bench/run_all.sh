#!/bin/sh
# Run every benchmark (startup, cached_build, run_true, images, lifecycle, kernel, boot_phases, shares, execs, concurrency, network, virtme); arguments go to each, e.g. --json, -n 3, -q.
exec python3 "$(dirname "$0")/__main__.py" "$@"
