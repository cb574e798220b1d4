package endpoint

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
)

// FuzzStateFile feeds arbitrary bytes as <state_dir>/endpoints/NNNNN.json
// to loadStates, the reader of the endpoint state files at start. A file
// is either restored as a sane endpoint or moved aside as corrupt; a
// restored endpoint satisfies what Add guarantees and survives
// writeState/loadStates unchanged.
func FuzzStateFile(f *testing.F) {
	good := Endpoint{ID: 4, Name: "web-1", Netns: "/run/netns/web-1", State: StateReady,
		Labels: identity.MustLabels("app", "web", "env", "prod"), IdentityLabels: identity.MustLabels("app", "web"),
		Identity: identity.Make(3, 300), IPv4: netip.MustParseAddr("10.250.1.4"), IPv6: netip.MustParseAddr("fd00::4"),
		HostIfName: "rw00004", HostIfIndex: 9, HostMAC: "02:00:00:00:00:01", MAC: "02:00:00:00:00:02",
		Created: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)}
	seed := func(id uint16, ep Endpoint, version int) {
		b, _ := json.MarshalIndent(stateFile{Version: version, Endpoint: ep}, "", "  ")
		f.Add(id, b)
	}
	seed(4, good, 1)
	seed(4, good, 2)
	seed(5, good, 1)
	lost := good
	lost.State, lost.IPv6 = StateLost, netip.Addr{}
	seed(4, lost, 1)
	creating := good
	creating.State, creating.IPv4 = StateCreating, netip.Addr{}
	seed(4, creating, 1)
	bad := good
	bad.Labels = identity.Labels{{Key: "reserved:host", Value: ""}}
	seed(4, bad, 1)
	wrongFamily := good
	wrongFamily.IPv4 = netip.MustParseAddr("fd00::5")
	seed(4, wrongFamily, 1)
	f.Add(uint16(0), []byte(`{"version":1,"endpoint":{"id":0}}`))
	f.Add(uint16(4), []byte(`{"version":1,"endpoint":{"id":4,"name":"a","state":"ready","ipv4":"10.0.0.1","host_ifname":"x","labels":[{"key":"b","value":""},{"key":"a","value":""}]}}`))
	f.Add(uint16(4), []byte(`{"version":1,"endpoint":{"id":4,"name":"a","state":"ready","ipv4":"10.0.0.1","host_ifname":"x","identity_labels":[{"key":"reserved:host","value":""}]}}`))
	f.Add(uint16(4), []byte(`{"version":1,"endpoint":{"id":4},"extra":1}`))
	f.Add(uint16(4), []byte(`{"version":1} {"version":2}`))
	f.Add(uint16(4), []byte("\x00"))
	f.Fuzz(func(t *testing.T, id uint16, data []byte) {
		dir := fuzzDir(t)
		name := filepath.Join(dir, fmt.Sprintf("%05d.json", id))
		if err := os.WriteFile(name, data, 0o600); err != nil {
			t.Fatal(err)
		}
		log := slog.New(slog.DiscardHandler)
		eps, corrupt, err := loadStates(dir, log)
		if err != nil {
			t.Fatalf("loadStates: %v", err)
		}
		if len(eps)+len(corrupt) != 1 {
			t.Fatalf("one file: %d endpoints, %d corrupt", len(eps), len(corrupt))
		}
		if len(corrupt) == 1 {
			if _, err := os.Stat(name); err == nil {
				t.Fatal("corrupt file left in place")
			}
			return
		}
		ep := eps[0]
		if ep.ID != id || id == 0 {
			t.Fatalf("file %05d restored as endpoint %d", id, ep.ID)
		}
		if err := checkName(ep.Name); err != nil {
			t.Fatalf("restored endpoint with bad name: %v", err)
		}
		switch ep.State {
		case StateCreating, StateReady, StateLost:
		default:
			t.Fatalf("restored state %q", ep.State)
		}
		if len(ep.IPs()) == 0 || ep.HostIfName == "" || ep.IPv4.IsValid() && !ep.IPv4.Is4() || ep.IPv6.IsValid() && !ep.IPv6.Is6() {
			t.Fatalf("restored endpoint without usable addresses or interface: %+v", ep)
		}
		canon, err := checkLabels(ep.Labels)
		if err != nil {
			t.Fatalf("restored labels %v: %v", ep.Labels, err)
		}
		{
			// parseState canonicalises Labels and checks IdentityLabels,
			// which Restore hands to the identity allocator.
			if !canon.Equal(ep.Labels) || len(canon) != len(ep.Labels) || canon.String() != ep.Labels.String() {
				t.Fatalf("restored labels %q are not canonical (%q)", ep.Labels.String(), canon.String())
			}
			idl, err := checkLabels(ep.IdentityLabels)
			if err != nil || idl.String() != ep.IdentityLabels.String() {
				t.Fatalf("restored identity labels %q: %v", ep.IdentityLabels.String(), err)
			}
		}
		// Round trip: what loadStates restores, writeState writes and
		// loadStates restores again, unchanged.
		dir2 := fuzzDir(t)
		if err := writeState(dir2, ep); err != nil {
			t.Fatalf("writeState of a restored endpoint: %v", err)
		}
		again, corrupt, err := loadStates(dir2, log)
		if err != nil || len(corrupt) != 0 || len(again) != 1 {
			t.Fatalf("restored endpoint written and read again: %v, corrupt %v", err, corrupt)
		}
		b1, _ := json.Marshal(ep)
		b2, _ := json.Marshal(again[0])
		if !bytes.Equal(b1, b2) {
			t.Fatalf("round trip changed the endpoint:\n%s\n%s", b1, b2)
		}
	})
}

// fuzzDir is a fresh directory for one fuzz input: on tmpfs when there is
// one, so that the fsyncs of the code under test cost nothing. A fuzz
// worker stopped at the end of -fuzztime skips its cleanups: directories
// of earlier runs older than ten minutes are removed on the first call.
func fuzzDir(t *testing.T) string {
	sweepOnce.Do(func() {
		old, _ := filepath.Glob("/dev/shm/rackwire-fuzz-*")
		for _, d := range old {
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > 10*time.Minute {
				os.RemoveAll(d)
			}
		}
	})
	if d, err := os.MkdirTemp("/dev/shm", "rackwire-fuzz-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	return t.TempDir()
}

var sweepOnce sync.Once
