package cniplugin

import (
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/rackwire/rackwire/daemon/endpoint"
)

func TestParseArgs(t *testing.T) {
	for _, c := range []struct {
		in     string
		labels string // merged with the config {"app":"cfg","tier":"cfg"}
		code   uint
	}{
		{in: "", labels: "app=cfg,tier=cfg"},
		{in: "RACKWIRE_LABEL_app=web", labels: "app=web,tier=cfg"},
		{in: "IgnoreUnknown=1;K8S_POD_NAME=p;RACKWIRE_LABEL_x=y", labels: "app=cfg,tier=cfg,x=y"},
		{in: "IgnoreUnknown=1;NOMAD_JOB_ID=api;NOMAD_ALLOC_ID=a-1", labels: "app=cfg,nomad.alloc_id=a-1,nomad.job=api,tier=cfg"},
		{in: "NOMAD_JOB_ID=api;NOMAD_GROUP_NAME=g;NOMAD_NAMESPACE=ns;NOMAD_REGION=r", labels: "app=cfg,nomad.group=g,nomad.job=api,nomad.namespace=ns,nomad.region=r,tier=cfg"},
		{in: "K8S_POD_NAME=p", code: types.ErrInvalidEnvironmentVariables},
		{in: "IgnoreUnknown=0;K8S_POD_NAME=p", code: types.ErrInvalidEnvironmentVariables},
		{in: "RACKWIRE_LABEL_app", code: types.ErrInvalidEnvironmentVariables},
		{in: "RACKWIRE_LABEL_app=a b", code: types.ErrInvalidEnvironmentVariables},
		{in: "RACKWIRE_LABEL_app=a;RACKWIRE_LABEL_app=b", code: types.ErrInvalidEnvironmentVariables},
		{in: "NOMAD_JOB_ID=a b", code: types.ErrInvalidEnvironmentVariables},
		{in: "RACKWIRE_LABEL_nomad.job=x", code: types.ErrInvalidNetworkConfig},
	} {
		conf, err := ParseConfig([]byte(`{"name":"n","type":"rackwire-cni","labels":{"app":"cfg","tier":"cfg"}}`))
		if err != nil {
			t.Fatal(err)
		}
		a, err := ParseArgs(c.in)
		if err == nil {
			var ls interface{ CLI() string }
			ls, err = conf.MergeLabels(a)
			if err == nil {
				if c.code != 0 || ls.CLI() != c.labels {
					t.Errorf("ParseArgs(%q) = %s, want labels %q code %d", c.in, ls.CLI(), c.labels, c.code)
				}
				continue
			}
		}
		if c.code == 0 {
			t.Errorf("ParseArgs(%q): %v, want labels %q", c.in, err, c.labels)
			continue
		}
		cniErr(t, c.in, err, c.code)
	}
}

func TestEndpointName(t *testing.T) {
	long := strings.Repeat("n", 200)
	cid := strings.Repeat("0123456789abcdef", 4)
	for _, c := range []struct{ net, cid, ifName, want string }{
		{"podman", cid, "eth0", "podman-0123456789abcdef"},
		{"podman", "abc", "", "podman-abc"},
		{"podman", cid, "net1", "podman-0123456789abcdef-net1"},
		{long, cid, "abcdefghijklmno", strings.Repeat("n", 30) + "-0123456789abcdef-abcdefghijklmno"},
	} {
		got := EndpointName(c.net, c.cid, c.ifName)
		if got != c.want {
			t.Errorf("EndpointName(%q, %q, %q) = %q, want %q", c.net, c.cid, c.ifName, got, c.want)
		}
		if err := endpoint.CheckName(got); err != nil {
			t.Errorf("EndpointName(%q, %q, %q) = %q, not an endpoint name: %v", c.net, c.cid, c.ifName, got, err)
		}
	}
}
