package policy_test

import (
	"fmt"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
)

func Example() {
	e := policy.New(nil, policy.Options{})
	web := identity.Make(1, 300)
	client := identity.Make(1, 301)
	e.UpsertIdentity(web, identity.MustLabels("app", "web"))
	e.UpsertIdentity(client, identity.MustLabels("app", "client"))
	e.UpsertEndpoint(794, web, identity.MustLabels("app", "web"), false)

	ps, err := policy.LoadFile("../../docs/examples/quickstart.yaml")
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := e.SetPolicies(policy.SourceFile("quickstart.yaml"), ps); err != nil {
		fmt.Println(err)
		return
	}
	for _, ch := range e.Changes() {
		fmt.Printf("endpoint %d full=%v\n", ch.Endpoint, ch.Full)
		for _, en := range ch.Add {
			fmt.Printf("  %+v\n", en)
		}
	}
	r, _ := e.Trace(policy.Subject{Labels: identity.MustLabels("app", "client")}, policy.Subject{Endpoint: 794}, 80, policy.ProtoTCP)
	fmt.Println(r.Verdict, r.Ingress.Policy, r.Ingress.Rule)
	// Output:
	// endpoint 794 full=true
	//   {Identity:16777517 Direction:0 Proto:6 Port:80 EndPort:0 Deny:false}
	//   {Identity:0 Direction:1 Proto:0 Port:0 EndPort:0 Deny:false}
	// allowed quickstart-web spec.ingress[0]
}
