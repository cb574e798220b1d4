package config

import (
	"strings"
	"testing"
)

func TestServicesConfig(t *testing.T) {
	const head = "version = 1\n[ipam]\ncidrs = [\"10.250.1.0/24\"]\n[bgp]\nvip_ranges = [\"10.96.0.0/16\"]\nannounce_service_vips = true\n"
	good := head + `
[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
backends = ["10.250.1.5:8080", "10.250.2.5:8080"]

[[services]]
name = "dns"
vip = "10.96.0.10"
port = 53
protocol = "udp"
backends = ["10.250.1.6:53"]
`
	cfg, err := Parse("good.toml", []byte(good))
	if err != nil {
		t.Fatalf("Parse(good) = %v", err)
	}
	if len(cfg.Services) != 2 || cfg.Services[0].Protocol != "tcp" || !cfg.BGP.AnnounceServiceVIPs {
		t.Errorf("Parse(good) = %+v, want two services, the first defaulted to tcp, announce on", cfg.Services)
	}
	noRanges := "version = 1\n[ipam]\ncidrs = [\"10.250.1.0/24\"]\n[[services]]\nname = \"web\"\nvip = \"10.250.1.1\"\nport = 80\n"
	if _, err := Parse("x.toml", []byte(noRanges)); err == nil || !strings.Contains(err.Error(), "[ipam] cidrs") {
		t.Errorf("Parse(VIP in the workload CIDR) = %v, want an error naming [ipam] cidrs", err)
	}
	for _, tc := range []struct{ name, body, want string }{
		{"unknown key", `[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
weight = 3`, `services.weight: unknown key`},
		{"bad vip", `[[services]]
name = "web"
vip = "10.96.0.300"
port = 80`, `bad VIP`},
		{"vip outside ranges", `[[services]]
name = "web"
vip = "192.0.2.1"
port = 80`, `vip_ranges`},
		{"port 0", `[[services]]
name = "web"
vip = "10.96.0.10"
port = 0`, `bad port 0`},
		{"protocol", `[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
protocol = "sctp"`, `want tcp or udp`},
		{"backend", `[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
backends = ["10.250.1.5"]`, `services[0].backends: bad backend`},
		{"duplicate name", `[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
[[services]]
name = "web"
vip = "10.96.0.11"
port = 80`, `names another`},
		{"duplicate frontend", `[[services]]
name = "a"
vip = "10.96.0.10"
port = 80
[[services]]
name = "b"
vip = "10.96.0.10"
port = 80`, `one service per VIP`},
		{"bad name", `[[services]]
name = "we b"
vip = "10.96.0.10"
port = 80`, `bad service name`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("x.toml", []byte(head+tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse(%s) = %v, want an error with %q", tc.name, err, tc.want)
			}
			if err != nil && !strings.Contains(err.Error(), "x.toml:") {
				t.Errorf("error %q does not name the file and line", err)
			}
		})
	}
}
