# Shared by run_latency.sh and run_unequal.sh (sourced): two network namespaces joined
# by a veth pair, 10.213.0.1 (pk_ns0, pk_veth0) <-> 10.213.0.2 (pk_ns1, pk_veth1). No
# traffic leaves them; shaping (tc) is done per run by bench.py's shape().
NS0=pk_ns0; NS1=pk_ns1; DEV0=pk_veth0; DEV1=pk_veth1; A0=10.213.0.1; A1=10.213.0.2
netns_down() {
  ip netns del "$NS0" 2>/dev/null || true
  ip netns del "$NS1" 2>/dev/null || true
  ip link del "$DEV0" 2>/dev/null || true
}
netns_up() {
  netns_down
  ip netns add "$NS0"
  ip netns add "$NS1"
  ip link add "$DEV0" type veth peer name "$DEV1"
  ip link set "$DEV0" netns "$NS0"
  ip link set "$DEV1" netns "$NS1"
  ip -n "$NS0" addr add "$A0/24" dev "$DEV0"
  ip -n "$NS1" addr add "$A1/24" dev "$DEV1"
  for ns in "$NS0" "$NS1"; do ip -n "$ns" link set lo up; done
  ip -n "$NS0" link set "$DEV0" up
  ip -n "$NS1" link set "$DEV1" up
}
