package datapath

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/internal/testenv"
)

func mapIDs(t *testing.T, d *Datapath) map[string]ebpf.MapID {
	t.Helper()
	ids := map[string]ebpf.MapID{}
	for name, m := range d.maps {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids[name] = id
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for epid, m := range d.policy {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids[policyMapName(epid)] = id
	}
	return ids
}

// TestPinReuse opens the datapath twice on one pin directory: the second
// agent must find the very same maps (same ids) and entries.
func TestPinReuse(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testPinDir(t)
	d1 := openTest(t, Options{PinDir: dir})
	setupEndpoint(t, d1, false)
	entry := Entry{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 443}
	if err := d1.SetPolicy(epID, []Entry{entry}); err != nil {
		t.Fatal(err)
	}
	before := mapIDs(t, d1)
	d1.Close()

	// A different configured size must not re-create anything.
	d2 := openTest(t, Options{PinDir: dir, CTMaxEntries: 8192})
	got, err := d2.Policy(epID) // re-adopts rw_policy_00794
	if err != nil {
		t.Fatal(err)
	}
	after := mapIDs(t, d2)
	for name, id := range before {
		if after[name] != id {
			t.Errorf("map %s: id %d after reopen, want %d", name, after[name], id)
		}
	}
	if len(got) != 1 || got[0].Port != 443 {
		t.Errorf("Policy() after reopen = %+v, want the 443 entry", got)
	}
	eps, err := d2.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) != 2 || eps[0].ID != epID || eps[0].Identity != epIdentity {
		t.Errorf("Endpoints() after reopen = %+v, want the two addresses of endpoint %d", eps, epID)
	}
	if n := d2.maps["rw_ct4_tcp"].MaxEntries(); n != 4096 {
		t.Errorf("rw_ct4_tcp max entries after reopen = %d, want the pinned 4096", n)
	}
	// The north-south NAT map follows ct_max_entries (half of it), so a
	// host with small CT tables does not hold 32 MB of NAT entries.
	if n := d2.maps["rw_svc_nat"].MaxEntries(); n != 2048 {
		t.Errorf("rw_svc_nat max entries = %d, want 2048 (ct_max_entries 4096 / 2, as first opened)", n)
	}
}

// TestBpftoolRecipes runs the operator's recipes of docs/datapath.md with
// the real bpftool: dump a policy map and open an endpoint's ingress with
// the all-zero key.
func TestBpftoolRecipes(t *testing.T) {
	testenv.RequireRoot(t)
	bpftool := testenv.RequireCommand(t, "bpftool")
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Egress, Proto: protoUDP, Port: 53}}); err != nil {
		t.Fatal(err)
	}
	pinned := filepath.Join(d.PinDir(), "rw_policy_00794")

	dumped, err := exec.Command(bpftool, "-j", "map", "dump", "pinned", pinned).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool map dump: %v\n%s", err, dumped)
	}
	var dump []json.RawMessage
	if err := json.Unmarshal(dumped, &dump); err != nil {
		t.Fatalf("bpftool map dump output: %v\n%s", err, dumped)
	}
	t.Logf("bpftool -j map dump pinned %s:\n%s", pinned, dumped)
	if len(dump) != 3 { // the entry and the two meta entries
		t.Errorf("bpftool map dump has %d entries, want 3:\n%s", len(dump), dumped)
	}
	if !strings.Contains(string(dumped), "2000") {
		t.Errorf("bpftool map dump does not show identity 2000:\n%s", dumped)
	}

	if got := run(t, d.to, in(unknown4, protoTCP, 8080)); got != dropRet {
		t.Fatalf("before the update = %#x, want drop", got)
	}
	args := []string{"map", "update", "pinned", pinned, "key", "hex"}
	args = append(args, strings.Fields(strings.Repeat("00 ", 8))...)
	args = append(args, "value", "hex")
	args = append(args, strings.Fields(strings.Repeat("00 ", 24))...)
	args = append(args, "noexist")
	if out, err := exec.Command(bpftool, args...).CombinedOutput(); err != nil {
		t.Fatalf("bpftool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, p := range []pkt{in(unknown4, protoTCP, 8080), in(peerV6, protoUDP, 9), in(netV4, protoICMP, 8)} {
		if got := run(t, d.to, p); got != passRet {
			t.Errorf("after the all-zero key %+v = %#x, want pass", p, got)
		}
	}
	if got := run(t, d.from, out(netV4, protoTCP, 80)); got != dropRet {
		t.Errorf("egress after the all-zero key = %#x, want drop (ingress only)", got)
	}
	entries, err := d.Policy(epID)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 || entries[0] != (Entry{Direction: Ingress, Packets: 3, Bytes: entries[0].Bytes}) {
		t.Errorf("Policy() = %+v, want the all-zero entry with 3 packets first", entries)
	}
}

func TestCleanupRemovesPins(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testPinDir(t)
	d := openTest(t, Options{PinDir: dir})
	setupEndpoint(t, d, false)
	before := mapIDs(t, d)
	d.Close()
	if err := Cleanup(dir); err != nil {
		t.Fatalf("Cleanup(%s) = %v", dir, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s after Cleanup: %v, want gone", dir, err)
	}
	d2 := openTest(t, Options{PinDir: dir})
	after := mapIDs(t, d2)
	if after["rw_ct4_tcp"] == before["rw_ct4_tcp"] {
		t.Errorf("rw_ct4_tcp id %d survived Cleanup", after["rw_ct4_tcp"])
	}
	if _, err := d2.Policy(epID); !errors.Is(err, ErrUnknownEndpoint) {
		t.Errorf("Policy(%d) after Cleanup error = %v, want ErrUnknownEndpoint", epID, err)
	}
}
