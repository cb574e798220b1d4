package api_test

import (
	"bytes"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/bgp"
	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/policy"
)

// wireGolden lists, for every wire type, the JSON field paths of a value
// with every field set ("a.b" for a nested object, "a[].b" for the objects
// of an array). A renamed, added or removed field fails the test: the CLI,
// the CNI plugin, scripts parsing `--json` and tests/ read these names, so
// a change has to be deliberate, here.
var wireGolden = map[string][]string{
	"AgentStatus": {"cluster", "cluster_id", "commit", "config_file", "last_reload", "node", "pid", "reload_error", "reloads", "started_at", "uptime", "version"},
	"AllowAll":    {"endpoint", "result"},
	"BFDSession":  {"address", "interface", "interval_ns", "protocol", "since", "state", "timeout_ns"},
	"BGPApply":    {"error", "ok", "reconfigured", "rolled_back", "time", "written"},
	"BGPDrain":    {"drained", "keep"},
	"BGPProtocol": {"bgp_state", "channels", "channels.k", "info", "last_error", "name", "neighbor_address", "neighbor_as", "proto", "reason", "routes_exported", "routes_filtered", "routes_imported", "since", "since_text", "state", "table", "uptime_seconds"},
	"BGPRender":   {"config"},
	"BGPStatus": {"announced", "bfd_sessions", "bfd_sessions[].address", "bfd_sessions[].interface", "bfd_sessions[].interval_ns", "bfd_sessions[].protocol", "bfd_sessions[].since", "bfd_sessions[].state", "bfd_sessions[].timeout_ns",
		"bird_config", "bird_error", "bird_running", "bird_socket", "drain_keep", "drained", "enabled",
		"last_apply", "last_apply.error", "last_apply.ok", "last_apply.reconfigured", "last_apply.rolled_back", "last_apply.time", "last_apply.written",
		"protocols", "protocols[].bgp_state", "protocols[].channels", "protocols[].channels.k", "protocols[].info", "protocols[].last_error", "protocols[].name", "protocols[].neighbor_address", "protocols[].neighbor_as", "protocols[].proto", "protocols[].reason", "protocols[].routes_exported", "protocols[].routes_filtered", "protocols[].routes_imported", "protocols[].since", "protocols[].since_text", "protocols[].state", "protocols[].table", "protocols[].uptime_seconds",
		"vips", "vips[].announced", "vips[].checked", "vips[].consecutive_fail", "vips[].consecutive_ok", "vips[].healthy", "vips[].last_check", "vips[].last_error", "vips[].target", "vips[].type", "vips[].vip"},
	"BGPUndrain": {"drained"},
	"CTEntry":    {"audit", "bytes", "created", "direction", "dst", "endpoint", "expires_in", "fin_orig", "fin_reply", "last_seen", "next_hop", "next_hop.age", "next_hop.ifindex", "next_hop.mac", "next_hop.mtu", "packets", "proto", "remote_identity", "revision", "rst", "src", "state", "tcp_flags"},
	"CTFlushed":  {"deleted", "endpoint"},
	"CTNextHop":  {"age", "ifindex", "mac", "mtu"},
	"Component":  {"detail", "detail.k", "message", "since", "state"},
	"Deleted":    {"deleted"},
	"Endpoint": {"audit", "container_id", "created", "gateway_ipv4", "gateway_ipv6", "host_ifindex", "host_ifname", "host_mac", "id", "identity", "identity_labels",
		"ifname", "ipv4", "ipv6", "labels", "mac", "name", "netns", "network", "policy_reason", "routes", "routes[].dst", "routes[].via", "state"},
	"EndpointAdd":        {"container_id", "ifname", "ip", "ipv6", "labels", "name", "netns", "network"},
	"Attachment":         {"container_id", "ifname"},
	"AttachmentGC":       {"keep", "keep[].container_id", "keep[].ifname", "network"},
	"AttachmentGCResult": {"deleted", "failed"},
	"Ready":              {"ready", "reason"},
	"EndpointRoute":      {"dst", "via"},
	"EndpointAudit":      {"enabled"},
	"ErrorBody":          {"error", "hint"},
	"Event":              {"dst", "dst_identity", "dst_labels", "direction", "endpoint", "endpoint_name", "len", "limit", "lost", "proto", "reason", "src", "src_identity", "src_labels", "suppressed", "time", "type", "verdict", "vip"},
	"IPCacheEntry":       {"host_ip", "identity", "labels", "prefix"},
	"Identity":           {"id", "labels", "scope", "users"},
	"KernelFeature":      {"available", "fallback", "name"},
	"Metric":             {"bytes", "direction", "packets", "reason"},
	"Node":               {"bgp_asn", "cidrs", "cluster", "ips", "name", "version"},
	"PolicyDocument":     {"policy", "source"},
	"PolicyEntry":        {"bytes", "direction", "emergency", "end_port", "identity", "identity_labels", "packets", "port", "proto", "verdict"},
	"PolicyImport":       {"data", "file"},
	"PolicySummary":      {"name", "rules", "source"},
	"RawEntry":           {"deny", "direction", "end_port", "identity", "port", "proto"},
	"Status": {"agent", "agent.cluster", "agent.cluster_id", "agent.commit", "agent.config_file", "agent.last_reload", "agent.node", "agent.pid", "agent.reload_error", "agent.reloads", "agent.started_at", "agent.uptime", "agent.version",
		"bgp", "bgp.detail", "bgp.detail.k", "bgp.message", "bgp.since", "bgp.state",
		"datapath", "datapath.detail", "datapath.detail.k", "datapath.message", "datapath.since", "datapath.state",
		"endpoints", "endpoints.detail", "endpoints.detail.k", "endpoints.message", "endpoints.since", "endpoints.state",
		"identities", "identities.detail", "identities.detail.k", "identities.message", "identities.since", "identities.state",
		"kernel_features", "kernel_features[].available", "kernel_features[].fallback", "kernel_features[].name",
		"policy", "policy.detail", "policy.detail.k", "policy.message", "policy.since", "policy.state",
		"store", "store.detail", "store.detail.k", "store.message", "store.since", "store.state"},
	"Service": {"active", "backends", "backends[].address", "backends[].local", "backends[].node", "backends[].source", "backends[].state",
		"frontend", "name", "port", "protocol", "source", "total", "vip"},
	"ServiceBackend": {"address", "local", "node", "source", "state"},
	"ServiceList": {"error", "problems", "programmed", "services", "services[].active", "services[].backends", "services[].backends[].address",
		"services[].backends[].local", "services[].backends[].node", "services[].backends[].source", "services[].backends[].state",
		"services[].frontend", "services[].name", "services[].port", "services[].protocol", "services[].source", "services[].total", "services[].vip"},
	"ServiceSpec":   {"backends", "name", "port", "protocol", "vip"},
	"TraceRequest":  {"dport", "dst", "dst.endpoint", "dst.ip", "dst.labels", "src", "src.endpoint", "src.ip", "src.labels"},
	"TraceResolved": {"endpoint", "identity", "ip", "kind", "labels"},
	"TraceResult": {"dport", "dst", "dst.endpoint", "dst.identity", "dst.ip", "dst.kind", "dst.labels",
		"egress", "egress.audit", "egress.policy", "egress.reason", "egress.rule", "egress.rule_index", "egress.source", "egress.verdict",
		"ingress", "ingress.audit", "ingress.policy", "ingress.reason", "ingress.rule", "ingress.rule_index", "ingress.source", "ingress.verdict",
		"proto", "src", "src.endpoint", "src.identity", "src.ip", "src.kind", "src.labels", "verdict"},
	"TraceSide":    {"audit", "policy", "reason", "rule", "rule_index", "source", "verdict"},
	"TraceSubject": {"endpoint", "ip", "labels"},
	"VIPStatus":    {"announced", "checked", "consecutive_fail", "consecutive_ok", "healthy", "last_check", "last_error", "target", "type", "vip"},
}

// wireTypes are the values the test encodes, one per wire type.
var wireTypes = []any{
	api.AgentStatus{}, api.AllowAll{}, api.BFDSession{}, api.BGPApply{}, api.BGPDrain{}, api.BGPProtocol{},
	api.BGPRender{}, api.BGPStatus{}, api.BGPUndrain{}, api.CTEntry{}, api.CTFlushed{}, api.CTNextHop{}, api.Component{}, api.Deleted{},
	api.Endpoint{}, api.EndpointAdd{}, api.EndpointAudit{}, api.ErrorBody{}, api.Event{}, api.IPCacheEntry{},
	api.Identity{}, api.KernelFeature{}, api.Metric{}, api.Node{}, api.PolicyDocument{}, api.PolicyEntry{},
	api.PolicyImport{}, api.PolicySummary{}, api.RawEntry{}, api.Status{}, api.TraceRequest{},
	api.TraceResolved{}, api.TraceResult{}, api.TraceSide{}, api.TraceSubject{}, api.VIPStatus{},
	api.Attachment{}, api.AttachmentGC{}, api.AttachmentGCResult{}, api.Ready{}, api.EndpointRoute{},
	api.Service{}, api.ServiceBackend{}, api.ServiceList{}, api.ServiceSpec{},
}

func TestWireFieldNames(t *testing.T) {
	seen := map[string]bool{}
	for _, zero := range wireTypes {
		typ := reflect.TypeOf(zero)
		name := typ.Name()
		seen[name] = true
		t.Run(name, func(t *testing.T) {
			full := reflect.New(typ)
			fill(full.Elem())
			data, err := json.Marshal(full.Interface())
			if err != nil {
				t.Fatal(err)
			}
			got := fieldPaths(t, data)
			want, ok := wireGolden[name]
			if !ok {
				t.Fatalf("no golden field list for %s; add\n\t%q: %#v,", name, name, got)
			}
			want = slices.Sorted(slices.Values(want))
			if !slices.Equal(got, want) {
				t.Errorf("JSON fields of %s changed (a rename breaks clients and `--json` users):\n got %q\nwant %q", name, got, want)
			}
			// Round trip: what a client decodes re-encodes to the same
			// bytes, full and zero.
			for _, v := range []any{full.Interface(), reflect.New(typ).Interface()} {
				first, err := json.Marshal(v)
				if err != nil {
					t.Fatal(err)
				}
				back := reflect.New(typ).Interface()
				dec := json.NewDecoder(bytes.NewReader(first))
				dec.DisallowUnknownFields()
				if err := dec.Decode(back); err != nil {
					t.Fatalf("decode %s: %v", first, err)
				}
				second, err := json.Marshal(back)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(first, second) {
					t.Errorf("%s does not survive a round trip:\n %s\n %s", name, first, second)
				}
			}
		})
	}
	for name := range wireGolden {
		if !seen[name] {
			t.Errorf("golden list for %s, which the test does not encode", name)
		}
	}
	// Every struct of the package with JSON tags is on the wire and must be
	// listed above.
	for _, name := range taggedStructs(t) {
		if !seen[name] {
			t.Errorf("api.%s has JSON tags but no golden field list: add it to wireTypes and wireGolden", name)
		}
	}
}

// TestMirrorsDaemonTypes checks that the wire types the daemon converts
// its components' structs into encode exactly as those structs do, so the
// conversion changed no field on the wire: a fully set daemon value
// decodes strictly into the api type and re-encodes to the same JSON, and
// so does the zero value.
func TestMirrorsDaemonTypes(t *testing.T) {
	for _, c := range []struct {
		name     string
		daemon   reflect.Type
		wireType reflect.Type
	}{
		{"bgp.Status", reflect.TypeFor[bgp.Status](), reflect.TypeFor[api.BGPStatus]()},
		{"bgp.ApplyStatus", reflect.TypeFor[bgp.ApplyStatus](), reflect.TypeFor[api.BGPApply]()},
		{"policy.TraceResult", reflect.TypeFor[policy.TraceResult](), reflect.TypeFor[api.TraceResult]()},
		{"datapath.CTEntry", reflect.TypeFor[datapath.CTEntry](), reflect.TypeFor[api.CTEntry]()},
		{"datapath.Metric", reflect.TypeFor[datapath.Metric](), reflect.TypeFor[api.Metric]()},
	} {
		t.Run(c.name, func(t *testing.T) {
			full := reflect.New(c.daemon)
			fill(full.Elem())
			for _, v := range []any{full.Interface(), reflect.New(c.daemon).Interface()} {
				src, err := json.Marshal(v)
				if err != nil {
					t.Fatal(err)
				}
				w := reflect.New(c.wireType).Interface()
				dec := json.NewDecoder(bytes.NewReader(src))
				dec.DisallowUnknownFields()
				if err := dec.Decode(w); err != nil {
					t.Fatalf("%s JSON does not decode into %s: %v\n%s", c.name, c.wireType, err, src)
				}
				out, err := json.Marshal(w)
				if err != nil {
					t.Fatal(err)
				}
				var a, b any
				_ = json.Unmarshal(src, &a)
				_ = json.Unmarshal(out, &b)
				if !reflect.DeepEqual(a, b) {
					t.Errorf("%s and %s encode differently:\n%s\n%s", c.name, c.wireType, src, out)
				}
			}
		})
	}
}

var (
	fixedTime = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	timeType  = reflect.TypeFor[time.Time]()
	rawType   = reflect.TypeFor[json.RawMessage]()
	addrType  = reflect.TypeFor[netip.Addr]()
	apType    = reflect.TypeFor[netip.AddrPort]()
	pfxType   = reflect.TypeFor[netip.Prefix]()
)

// fill sets every exported field of v, recursively, to a non-zero value,
// so omitempty fields show.
func fill(v reflect.Value) {
	switch v.Type() {
	case timeType:
		v.Set(reflect.ValueOf(fixedTime))
		return
	case rawType:
		v.Set(reflect.ValueOf(json.RawMessage(`{}`)))
		return
	case addrType:
		v.Set(reflect.ValueOf(netip.MustParseAddr("192.0.2.1")))
		return
	case apType:
		v.Set(reflect.ValueOf(netip.MustParseAddrPort("192.0.2.1:80")))
		return
	case pfxType:
		v.Set(reflect.ValueOf(netip.MustParsePrefix("192.0.2.0/24")))
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i))
			}
		}
	case reflect.Pointer:
		p := reflect.New(v.Type().Elem())
		fill(p.Elem())
		v.Set(p)
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 1, 1)
		fill(s.Index(0))
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		if k.Kind() == reflect.String {
			k.SetString("k")
		} else {
			fill(k)
		}
		fill(e)
		m.SetMapIndex(k, e)
		v.Set(m)
	case reflect.String:
		v.SetString("x")
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(1)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(1)
	case reflect.Float32, reflect.Float64:
		v.SetFloat(1.5)
	}
}

// fieldPaths lists the object keys of a JSON document, sorted.
func fieldPaths(t *testing.T, data []byte) []string {
	t.Helper()
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatal(err)
	}
	var out []string
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				p := k
				if prefix != "" {
					p = prefix + "." + k
				}
				out = append(out, p)
				walk(p, e)
			}
		case []any:
			for _, e := range x {
				walk(prefix+"[]", e)
			}
		}
	}
	walk("", v)
	sort.Strings(out)
	return slices.Compact(out)
}

// taggedStructs names the package's exported struct types that have a
// field with a json tag.
func taggedStructs(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	var out []string
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			ts, ok := n.(*ast.TypeSpec)
			if !ok || !ts.Name.IsExported() {
				return true
			}
			st, ok := ts.Type.(*ast.StructType)
			if !ok {
				return true
			}
			for _, fl := range st.Fields.List {
				if fl.Tag != nil && strings.Contains(fl.Tag.Value, `json:"`) {
					out = append(out, ts.Name.Name)
					break
				}
			}
			return true
		})
	}
	if len(out) == 0 {
		t.Fatal("found no tagged struct in the package source")
	}
	sort.Strings(out)
	return out
}
