// Package cniplugin is the rackwire-cni plugin: the CNI commands (ADD, DEL,
// CHECK, STATUS, GC; VERSION comes from the CNI library) for container
// runtimes that speak CNI (podman, containerd/nerdctl, Nomad), and the
// parsing of the network config and CNI_ARGS. cmd/rackwire-cni calls Main;
// nothing else imports this package.
//
// Design. The plugin owns no state: it is a client of rackwired's API
// socket (config key "socket"). The agent owns the endpoint, its veth,
// addresses, routes, identity and policy, and keeps them across its own
// restarts; the plugin turns one CNI call into one API call and the answer
// into a CNI result or error object.
//
//   - ADD asks POST /v1/endpoints with the container id, network name and
//     interface name. The agent writes the endpoint's policy before the
//     host side of the veth goes up, so the container is enforced before
//     ADD returns. A repeated ADD of the same attachment in the same
//     namespace returns the same result.
//   - DEL deletes the endpoint named after the network and container id,
//     only if it is that container's (?container_id=); an endpoint that is
//     not there (second DEL, unknown container, namespace gone) is success.
//   - CHECK compares the agent's endpoint with the runtime's and looks at
//     the interface in the namespace.
//   - GC deletes the network's endpoints that cni.dev/valid-attachments does
//     not name (POST /v1/attachments/gc).
//   - STATUS asks GET /v1/ready.
//
// Bad input is refused before the agent is asked: unknown config keys
// (code 2), an "ipam" section (rackwire allocates from the host's [ipam]
// cidrs; code 2), bad labels (code 7), bad CNI_ARGS (code 4). The agent
// down or starting is code 11 ("try again later") for ADD, DEL, CHECK and
// GC, and 50 for STATUS.
package cniplugin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/identity"
)

// PluginType is the "type" of rackwire's network configs.
const PluginType = "rackwire-cni"

// NetConf is a rackwire network config (one plugin of a conflist).
type NetConf struct {
	types.PluginConf
	// Socket is rackwired's API socket.
	Socket string `json:"socket,omitempty"`
	// Labels are given to every workload of the network.
	Labels map[string]string `json:"labels,omitempty"`
	// Args are the runtime's "args"; only args.cni.labels is read.
	Args struct {
		CNI struct {
			Labels []string `json:"labels,omitempty"`
		} `json:"cni"`
	} `json:"args"`
	RuntimeConfig json.RawMessage `json:"runtimeConfig,omitempty"`
}

// knownKeys are the config keys the plugin accepts: the spec's (including
// what libcni injects) and rackwire's. Anything else is an error, so that a
// typo does not silently change what a workload gets.
var knownKeys = map[string]bool{
	"cniVersion": true, "name": true, "type": true, "capabilities": true, "ipam": true, "dns": true,
	"prevResult": true, "runtimeConfig": true, "args": true, "cni.dev/valid-attachments": true,
	// libcni also sends the name an early draft of the spec used.
	"cni.dev/attachments": true,
	"socket":              true, "labels": true,
}

// maxConfig bounds the config read from stdin.
const maxConfig = 1 << 20

// ParseConfig decodes and checks a network config. Errors are CNI errors.
func ParseConfig(data []byte) (*NetConf, error) {
	if len(data) > maxConfig {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("network config is %d bytes, at most %d", len(data), maxConfig), "")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode network config: "+err.Error(), "write the config as a JSON object")
	}
	for _, k := range slices.Sorted(maps.Keys(raw)) {
		if !knownKeys[k] {
			return nil, types.NewError(types.ErrUnsupportedField, fmt.Sprintf("network config key %q is not a %s key", trunc(k), PluginType),
				"remove it; "+PluginType+" takes "+strings.Join(slices.Sorted(maps.Keys(knownKeys)), ", "))
		}
	}
	conf := &NetConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode network config: "+err.Error(), "")
	}
	if conf.Type != "" && conf.Type != PluginType {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("network config type is %q, not %q", trunc(conf.Type), PluginType), "")
	}
	if !conf.IPAM.IsEmpty() || (raw["ipam"] != nil && !bytes.Equal(bytes.TrimSpace(raw["ipam"]), []byte("{}")) && !bytes.Equal(bytes.TrimSpace(raw["ipam"]), []byte("null"))) {
		return nil, types.NewError(types.ErrUnsupportedField, "network config has an \"ipam\" section",
			"remove it: rackwired allocates addresses from the host's [ipam] cidrs")
	}
	if conf.Socket == "" {
		conf.Socket = api.DefaultSocket
	} else if !strings.HasPrefix(conf.Socket, "/") || len(conf.Socket) > 107 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("socket %q must be an absolute path of at most 107 bytes", trunc(conf.Socket)), "")
	}
	return conf, nil
}

// MergeLabels merges a workload's labels: the config's "labels" (every workload
// of the network), then args.cni.labels ("k=v"), then CNI_ARGS's
// RACKWIRE_LABEL_<key>=<value>, a later source overriding an earlier one;
// then Nomad's own args under "nomad.", which no other source may set.
func (c *NetConf) MergeLabels(a *Args) (identity.Labels, error) {
	m := map[string]string{}
	bad := func(src, msg string) error {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("%s: %s", src, msg), "labels are key=value with letters, digits and . _ - / : only")
	}
	set := func(src, k, v string) error {
		if strings.HasPrefix(k, NomadPrefix) {
			return bad(src, fmt.Sprintf("label %q: the %q prefix is Nomad's own", trunc(k), NomadPrefix))
		}
		m[k] = v
		return nil
	}
	for _, k := range slices.Sorted(maps.Keys(c.Labels)) {
		if err := set("network config labels", k, c.Labels[k]); err != nil {
			return nil, err
		}
	}
	for _, kv := range c.Args.CNI.Labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, bad("args.cni.labels", fmt.Sprintf("%q is not key=value", trunc(kv)))
		}
		if err := set("args.cni.labels", k, v); err != nil {
			return nil, err
		}
	}
	if a != nil {
		for _, l := range a.Labels {
			if err := set("CNI_ARGS "+LabelArgPrefix+"*", l.Key, l.Value); err != nil {
				return nil, err
			}
		}
		for _, l := range a.Nomad {
			m[l.Key] = l.Value
		}
	}
	ls, err := identity.NewLabels(m)
	if err != nil {
		return nil, bad("labels", err.Error())
	}
	if len(ls) == 0 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "the workload has no labels, so no identity",
			`give the network config "labels": {"app": "NAME"}, or args.cni.labels, or `+LabelArgPrefix+"app=NAME in CNI_ARGS")
	}
	return ls, nil
}

func trunc(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
