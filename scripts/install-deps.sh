#!/usr/bin/env bash
# Installs the Debian packages the demo, benchmarks and tests need. Idempotent: does nothing
# when every tool is already present.
set -euo pipefail

need=()
check() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
check ip iproute2
check bridge iproute2
check iperf3 iperf3
check etcd etcd-server
check etcdctl etcd-client
check iptables iptables
check iptables-restore iptables
check ping iputils-ping
check ethtool ethtool
check tshark tshark
check tcpdump tcpdump
# protoc is not needed to build (the etcd API code is committed): only tests/etcd_proto.rs,
# which checks that code against scripts/gen-etcd-proto, runs it.
check protoc protobuf-compiler
check pgrep procps
# tests/etcd_store.rs makes its TLS test certificates with the openssl CLI.
check openssl openssl
# The harness makes pods with the real CNI plugins (bridge, host-local, portmap, loopback),
# from Debian's package, in /usr/lib/cni.
for p in bridge host-local portmap loopback; do
  [ -x "/usr/lib/cni/$p" ] || need+=(containernetworking-plugins)
done

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing ${need[*]}; run as root (apt-get) or install them" >&2
  exit 1
fi
echo "install-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2207
apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
