package cniplugin

import (
	"fmt"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/rackwire/rackwire/daemon/identity"
)

// LabelArgPrefix starts a CNI_ARGS key that is a label: RACKWIRE_LABEL_app=web
// gives the workload app=web.
const LabelArgPrefix = "RACKWIRE_LABEL_"

// NomadPrefix starts the labels made from Nomad's own CNI_ARGS.
const NomadPrefix = "nomad."

// nomadArgs maps the CNI_ARGS Nomad passes in "cni/<network>" mode to
// labels (Nomad leaves out a key whose value holds a ';').
var nomadArgs = map[string]string{
	"NOMAD_REGION":     NomadPrefix + "region",
	"NOMAD_NAMESPACE":  NomadPrefix + "namespace",
	"NOMAD_JOB_ID":     NomadPrefix + "job",
	"NOMAD_GROUP_NAME": NomadPrefix + "group",
	"NOMAD_ALLOC_ID":   NomadPrefix + "alloc_id",
}

// cniArgs are the fixed CNI_ARGS keys, for types.LoadArgs (which honours
// IgnoreUnknown).
type cniArgs struct {
	types.CommonArgs
	NOMAD_REGION     types.UnmarshallableString
	NOMAD_NAMESPACE  types.UnmarshallableString
	NOMAD_JOB_ID     types.UnmarshallableString
	NOMAD_GROUP_NAME types.UnmarshallableString
	NOMAD_ALLOC_ID   types.UnmarshallableString
}

// Args is what the plugin takes from CNI_ARGS.
type Args struct {
	// Labels from RACKWIRE_LABEL_<key>=<value>.
	Labels []identity.Label
	// Nomad holds the labels made from Nomad's args.
	Nomad []identity.Label
}

// maxArgs bounds CNI_ARGS.
const maxArgs = 64 << 10

// ParseArgs parses CNI_ARGS: "K1=V1;K2=V2". Keys the plugin does not know
// are an error unless IgnoreUnknown is true (as the spec's convention
// says). Errors are CNI errors (code 4).
func ParseArgs(s string) (*Args, error) {
	bad := func(msg string) error {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS: "+msg,
			"write CNI_ARGS as KEY=VALUE pairs separated by ';', labels as "+LabelArgPrefix+"app=web")
	}
	a := &Args{}
	if s == "" {
		return a, nil
	}
	if len(s) > maxArgs {
		return nil, bad(fmt.Sprintf("%d bytes, at most %d", len(s), maxArgs))
	}
	var rest []string
	seen := map[string]bool{}
	for _, pair := range strings.Split(s, ";") {
		k, v, ok := strings.Cut(pair, "=")
		if !ok || strings.Contains(v, "=") {
			return nil, bad(fmt.Sprintf("%q is not KEY=VALUE", trunc(pair)))
		}
		if seen[k] {
			return nil, bad(fmt.Sprintf("%q given twice", trunc(k)))
		}
		seen[k] = true
		if key, ok := strings.CutPrefix(k, LabelArgPrefix); ok {
			if key == "" {
				return nil, bad(fmt.Sprintf("%q names no label key", trunc(k)))
			}
			a.Labels = append(a.Labels, identity.Label{Key: key, Value: v})
			continue
		}
		rest = append(rest, pair)
	}
	var ca cniArgs
	if err := types.LoadArgs(strings.Join(rest, ";"), &ca); err != nil {
		return nil, bad(err.Error())
	}
	for k, v := range map[string]types.UnmarshallableString{
		"NOMAD_REGION": ca.NOMAD_REGION, "NOMAD_NAMESPACE": ca.NOMAD_NAMESPACE, "NOMAD_JOB_ID": ca.NOMAD_JOB_ID,
		"NOMAD_GROUP_NAME": ca.NOMAD_GROUP_NAME, "NOMAD_ALLOC_ID": ca.NOMAD_ALLOC_ID,
	} {
		if seen[k] {
			a.Nomad = append(a.Nomad, identity.Label{Key: nomadArgs[k], Value: string(v)})
		}
	}
	// Each label on its own first, so the error names the pair at fault.
	for _, l := range append(append([]identity.Label(nil), a.Labels...), a.Nomad...) {
		if _, err := identity.NewLabels(map[string]string{l.Key: l.Value}); err != nil {
			return nil, bad(err.Error())
		}
	}
	return a, nil
}
