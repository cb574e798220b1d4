package cniplugin

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/rackwire/rackwire/daemon/identity"
)

// cniErr returns err's CNI code, failing the test if it is no CNI error
// or has none of the codes allowed.
func cniErr(t *testing.T, what string, err error, allowed ...uint) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: %v is not a CNI error object", what, err)
	}
	if !slices.Contains(allowed, e.Code) {
		t.Fatalf("%s: code %d (%v), want one of %v", what, e.Code, err, allowed)
	}
	if e.Msg == "" {
		t.Fatalf("%s: empty message", what)
	}
}

// checkLabels checks what MergeLabels returned: valid, canonical, and the
// "nomad." keys only from Nomad's args.
func checkMerged(t *testing.T, ls identity.Labels, a *Args) {
	t.Helper()
	back, err := identity.ParseLabels(ls.CLI())
	if err != nil || !back.Equal(ls) {
		t.Fatalf("labels %q do not survive the API's parse: %v", ls.CLI(), err)
	}
	nomad := map[string]bool{}
	if a != nil {
		for _, l := range a.Nomad {
			nomad[l.Key] = true
		}
	}
	for _, l := range ls {
		if strings.HasPrefix(l.Key, NomadPrefix) && !nomad[l.Key] {
			t.Fatalf("label %q has Nomad's prefix but no Nomad arg gave it", l.Key)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"cniVersion":"1.1.0","name":"n","type":"rackwire-cni","labels":{"app":"web"}}`,
		`{"name":"n","type":"rackwire-cni","socket":"/run/x.sock","args":{"cni":{"labels":["app=web","tier=x"]}}}`,
		`{"name":"n","type":"rackwire-cni","ipam":{"type":"host-local"}}`,
		`{"name":"n","type":"rackwire-cni","ipam":{}}`,
		`{"name":"n","labels":{"nomad.job":"x"}}`,
		`{"name":"n","labels":{"reserved:host":""}}`,
		`{"name":"n","lables":{}}`,
		`{"name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],"prevResult":{"cniVersion":"1.0.0"}}`,
		`[]`, `{`, `{"labels":[]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		conf, err := ParseConfig(data)
		if err != nil {
			cniErr(t, "ParseConfig", err, types.ErrDecodingFailure, types.ErrUnsupportedField, types.ErrInvalidNetworkConfig)
			return
		}
		if !strings.HasPrefix(conf.Socket, "/") {
			t.Fatalf("socket %q is not absolute", conf.Socket)
		}
		if !conf.IPAM.IsEmpty() {
			t.Fatalf("ipam %+v accepted", conf.IPAM)
		}
		ls, err := conf.MergeLabels(nil)
		if err != nil {
			cniErr(t, "MergeLabels", err, types.ErrInvalidNetworkConfig)
			return
		}
		checkMerged(t, ls, nil)
	})
}

func FuzzParseArgs(f *testing.F) {
	for _, s := range []string{
		"", "IgnoreUnknown=1", "IgnoreUnknown=true;K8S_POD_NAME=x", "FOO=bar",
		"RACKWIRE_LABEL_app=web;RACKWIRE_LABEL_tier=front",
		"IgnoreUnknown=1;NOMAD_JOB_ID=api;NOMAD_GROUP_NAME=g;NOMAD_ALLOC_ID=8f5f3b1e-2c4a;NOMAD_NAMESPACE=default;NOMAD_REGION=global",
		"RACKWIRE_LABEL_=x", "RACKWIRE_LABEL_app=a=b", "a", ";", "RACKWIRE_LABEL_nomad.job=x", "IgnoreUnknown=maybe",
		"RACKWIRE_LABEL_app=web;RACKWIRE_LABEL_app=db",
	} {
		f.Add(s, `{"name":"n","labels":{"app":"x"}}`)
	}
	f.Fuzz(func(t *testing.T, s, config string) {
		a, err := ParseArgs(s)
		if err != nil {
			cniErr(t, "ParseArgs", err, types.ErrInvalidEnvironmentVariables)
			return
		}
		for _, l := range a.Labels {
			if l.Key == "" || !strings.Contains(s, LabelArgPrefix+l.Key+"="+l.Value) {
				t.Fatalf("label %q=%q not in %q", l.Key, l.Value, s)
			}
		}
		for _, l := range a.Nomad {
			if !strings.HasPrefix(l.Key, NomadPrefix) {
				t.Fatalf("Nomad label %q without prefix", l.Key)
			}
		}
		conf, err := ParseConfig([]byte(config))
		if err != nil {
			return
		}
		ls, err := conf.MergeLabels(a)
		if err != nil {
			cniErr(t, "MergeLabels", err, types.ErrInvalidNetworkConfig)
			return
		}
		checkMerged(t, ls, a)
	})
}
