package datapath

import (
	"errors"
	"net/netip"
	"testing"
)

// TestIPCacheBatchWrite: host entries written in one batch (the kernel's
// BPF_MAP_UPDATE_BATCH) read back as written one by one: IPv4 and IPv6,
// with and without a host IP, over entries already there; a batch with
// an invalid address writes what comes before it and says which.
func TestIPCacheBatchWrite(t *testing.T) {
	d := openTest(t, Options{})
	hosts := []netip.Addr{netip.MustParseAddr("10.40.0.1"), netip.MustParseAddr("10.40.0.2"), netip.MustParseAddr("fd00:40::3"), netip.MustParseAddr("::ffff:10.40.0.4")}
	ids := []uint32{70001, 70002, 70003, 70004}
	hostIPs := []netip.Addr{netip.MustParseAddr("172.16.0.1"), {}, netip.MustParseAddr("fd00::1"), netip.MustParseAddr("172.16.0.2")}
	if err := d.UpsertIPCacheQuiet(netip.MustParsePrefix("10.40.0.2/32"), 1, netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	n, err := d.UpsertIPCacheBatchQuiet(hosts, ids, hostIPs)
	if err != nil || n != len(hosts) {
		t.Fatalf("UpsertIPCacheBatchQuiet = %d, %v", n, err)
	}
	for i, a := range hosts {
		e, ok, err := d.LookupIPCache(a)
		if err != nil || !ok || e.Identity != ids[i] || e.HostIP != hostIPs[i].Unmap() {
			t.Fatalf("%s = %+v, %v, %v; want identity %d host %v", a, e, ok, err, ids[i], hostIPs[i])
		}
	}
	n, err = d.UpsertIPCacheBatchQuiet([]netip.Addr{netip.MustParseAddr("10.40.0.9"), {}}, []uint32{70009, 70010}, []netip.Addr{{}, {}})
	if n != 1 || !errors.Is(err, ErrInvalidEntry) {
		t.Fatalf("a batch with an invalid second address = %d, %v; want 1 and ErrInvalidEntry", n, err)
	}
	if e, ok, err := d.LookupIPCache(netip.MustParseAddr("10.40.0.9")); err != nil || !ok || e.Identity != 70009 {
		t.Fatalf("the entry before the invalid one = %+v, %v, %v; want it written", e, ok, err)
	}
}
