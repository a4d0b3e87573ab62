#!/usr/bin/env bash
# Install the Debian packages a test Slurm cluster needs: slurmctld, slurmd, slurm-client, munge; for a multi-node
# one iproute2 (its network namespaces; nsenter and unshare come with util-linux), and openssh-server and pdsh (an
# sshd per node for the `deepspeed` launcher's hostfile runs).
#
# Usage: slurm/testing/install.sh        (as root; `make slurm-cluster` runs it before the test suite)
#
# Idempotent: a quick no-op when everything is installed. It starts no daemon (the tests start and stop their own,
# by pid): package maintainer scripts are stopped from starting services with a temporary /usr/sbin/policy-rc.d.
# Without root it only reports what is missing and exits 0, so the Slurm tests skip locally (and fail under CI=true).
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge iproute2 openssh-server pdsh)
binaries=(slurmctld slurmd sbatch munged ip sshd pdsh)

missing=()
for bin in "${binaries[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ] && [ ! -x "/sbin/$bin" ]; then
        missing+=("$bin")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm-cluster: ${packages[*]} already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-cluster: missing ${missing[*]}; as root run: apt-get install --no-install-recommends ${packages[*]}" >&2
    echo "slurm-cluster: the Slurm tests will be skipped (they fail under CI=true)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm-cluster: missing ${missing[*]} and no apt-get on this machine; install ${packages[*]} yourself" >&2
    exit 0
fi

# A policy-rc.d that answers 101 ("action forbidden") keeps invoke-rc.d from starting the daemons during install.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
cleanup() { if [ "$own_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
echo "slurm-cluster: installed ${packages[*]}"
