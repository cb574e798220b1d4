package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/identity"
)

const examplesDir = "../../docs/examples"

// TestDocsExamplesLoad loads every example file.
func TestDocsExamplesLoad(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(examplesDir, "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no examples in %s: %v", examplesDir, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			ps, err := LoadFile(f)
			if err != nil {
				t.Fatalf("LoadFile: %v", err)
			}
			if len(ps) == 0 {
				t.Fatalf("LoadFile(%s) found no policy", f)
			}
			if err := New(nil, Options{}).SetPolicies(f, ps); err != nil {
				t.Fatalf("SetPolicies: %v", err)
			}
		})
	}
}

var (
	exampleRE = regexp.MustCompile("(?s)<!-- example: docs/examples/([^ ]+) -->\n[^\n]*\n\n```[a-z]*\n(.*?)```")
	fenceRE   = regexp.MustCompile("(?s)```yaml\n(.*?)```")
)

// TestDocsPolicyMD keeps docs/policy.md and docs/examples in step: every
// example file is shown in the page as it is on disk, and every refused
// example on the page is refused with the error it claims.
func TestDocsPolicyMD(t *testing.T) {
	b, err := os.ReadFile("../../docs/policy.md")
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	shown := map[string]bool{}
	for _, m := range exampleRE.FindAllStringSubmatch(md, -1) {
		name, body := m[1], m[2]
		shown[name] = true
		disk, err := os.ReadFile(filepath.Join(examplesDir, name))
		if err != nil {
			t.Errorf("policy.md shows %s, which does not exist: %v", name, err)
			continue
		}
		if string(disk) != body {
			t.Errorf("policy.md shows %s differently from the file; copy the file into the page", name)
		}
	}
	files, _ := filepath.Glob(filepath.Join(examplesDir, "*"))
	for _, f := range files {
		if !shown[filepath.Base(f)] {
			t.Errorf("docs/examples/%s is not shown in docs/policy.md", filepath.Base(f))
		}
	}
	rejected := 0
	for _, m := range fenceRE.FindAllStringSubmatch(md, -1) {
		body := m[1]
		first, _, _ := strings.Cut(body, "\n")
		want, isRejected := strings.CutPrefix(first, "# rejected: ")
		_, err := Load("policy.md", []byte(body))
		switch {
		case isRejected:
			rejected++
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("policy.md example claims %q, Load says %v", want, err)
			}
		case strings.Contains(body, "apiVersion:") && err != nil:
			t.Errorf("policy.md example does not load: %v", err)
		}
	}
	if rejected < 2 {
		t.Errorf("policy.md shows %d refused examples, want at least 2", rejected)
	}
}

// TestDocsExamplesMean checks that examples mean what their comments say.
func TestDocsExamplesMean(t *testing.T) {
	l := identity.MustLabels
	cidr := func(s string) identity.Labels { return CIDRLabels(netip.MustParsePrefix(s)) }
	world := identity.ReservedLabels(identity.World)
	host := identity.ReservedLabels(identity.Host)
	tests := []struct {
		file     string
		src, dst identity.Labels
		port     uint16
		proto    uint8
		want     string
	}{
		{"quickstart.yaml", l("app", "client"), l("app", "web"), 80, tcp, VerdictAllowed},
		{"quickstart.yaml", l("app", "client"), l("app", "web"), 443, tcp, VerdictDenied},
		{"quickstart.yaml", l("app", "other"), l("app", "web"), 80, tcp, VerdictDenied},
		{"quickstart.yaml", l("app", "web"), l("app", "client"), 443, tcp, VerdictAllowed},
		{"default-deny.yaml", l("app", "x"), l("app", "vault"), 8200, tcp, VerdictDenied},
		{"default-deny.yaml", l("app", "vault"), l("app", "x"), 80, tcp, VerdictDenied},
		{"match-expressions.yaml", l("tier", "edge"), l("app", "api", "team", "a"), 80, tcp, VerdictAllowed},
		{"match-expressions.yaml", l("tier", "db"), l("app", "api", "team", "a"), 80, tcp, VerdictDenied},
		{"match-expressions.yaml", l("tier", "db"), l("app", "api", "team", "a", "canary", "y"), 80, tcp, VerdictAllowed},
		{"label-sources.yaml", host, l("app", "metrics"), 9100, tcp, VerdictAllowed},
		{"label-sources.yaml", l("app", "prometheus"), l("app", "metrics"), 9100, tcp, VerdictAllowed},
		{"all-endpoints.yaml", l("app", "anything"), l("app", "cache"), 6379, tcp, VerdictAllowed},
		{"all-endpoints.yaml", world, l("app", "cache"), 6379, tcp, VerdictDenied},
		{"egress-to-endpoints.yaml", l("app", "api"), l("app", "db"), 5432, tcp, VerdictAllowed},
		{"egress-to-endpoints.yaml", l("app", "api"), world, 443, tcp, VerdictDenied},
		{"to-cidr.yaml", l("app", "batch"), cidr("10.0.0.0/8"), 443, tcp, VerdictAllowed},
		{"to-cidr.yaml", l("app", "batch"), cidr("10.10.0.0/16"), 443, tcp, VerdictDenied},
		{"to-cidr.yaml", l("app", "batch"), cidr("192.0.2.0/24"), 22, tcp, VerdictAllowed},
		{"from-cidr.yaml", cidr("198.51.100.16/28"), l("app", "web"), 443, tcp, VerdictAllowed},
		{"from-cidr.yaml", cidr("2001:db8:bad::/64"), l("app", "web"), 443, tcp, VerdictDenied},
		{"entities.yaml", host, l("app", "web"), 8080, tcp, VerdictAllowed},
		{"entities.yaml", l("app", "web"), world, 443, tcp, VerdictAllowed},
		{"entities.yaml", l("app", "web"), world, 80, tcp, VerdictDenied},
		{"cluster-entity.yaml", l("app", "x"), l("app", "dns"), 53, udp, VerdictAllowed},
		{"cluster-entity.yaml", world, l("app", "dns"), 53, udp, VerdictDenied},
		{"ports.yaml", l("app", "client"), l("app", "media"), 10500, udp, VerdictAllowed},
		{"ports.yaml", l("app", "client"), l("app", "media"), 11000, udp, VerdictDenied},
		{"ports.yaml", l("app", "client"), l("app", "media"), 8443, sctp, VerdictAllowed},
		{"ports.yaml", l("app", "client"), l("app", "media"), 1, tcp, VerdictAllowed},
		{"l4-only.yaml", world, l("app", "web"), 80, tcp, VerdictAllowed},
		{"l4-only.yaml", world, l("app", "web"), 81, tcp, VerdictDenied},
		{"icmp.yaml", l("app", "x"), l("app", "y"), 8, icmp, VerdictAllowed},
		{"icmp.yaml", l("app", "x"), l("app", "y"), 128, icmp6, VerdictAllowed},
		{"icmp.yaml", l("app", "x"), l("app", "y"), 80, tcp, VerdictDenied},
		{"deny.yaml", world, l("app", "web"), 22, tcp, VerdictDenied},
		{"deny.yaml", world, l("app", "web"), 80, tcp, VerdictAllowed},
		{"deny.yaml", l("app", "web"), cidr("203.0.113.0/24"), 443, tcp, VerdictDenied},
		{"specs.yaml", world, l("tier", "frontend"), 443, tcp, VerdictAllowed},
		{"specs.yaml", world, l("tier", "backend"), 443, tcp, VerdictDenied},
		{"stream.yaml", l("app", "b"), l("app", "a"), 80, tcp, VerdictAllowed},
		{"list.yaml", l("app", "producer"), l("app", "queue"), 80, tcp, VerdictAllowed},
		{"policy.json", l("app", "web"), l("app", "api"), 8080, tcp, VerdictAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			ps, err := LoadFile(filepath.Join(examplesDir, tt.file))
			if err != nil {
				t.Fatal(err)
			}
			e := New(nil, Options{})
			if err := e.SetPolicies(tt.file, ps); err != nil {
				t.Fatal(err)
			}
			r, err := e.Trace(Subject{Labels: tt.src}, Subject{Labels: tt.dst}, tt.port, tt.proto)
			if err != nil {
				t.Fatal(err)
			}
			if r.Verdict != tt.want {
				t.Errorf("Trace(%s -> %s %d/%d) = %s, want %s (egress %+v, ingress %+v)", tt.src.CLI(), tt.dst.CLI(), tt.port, tt.proto, r.Verdict, tt.want, r.Egress, r.Ingress)
			}
		})
	}
}
