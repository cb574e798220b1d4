package policy

import (
	"encoding/json"
	"fmt"
)

// SourceFile names the source of a policy file for SetPolicies.
func SourceFile(path string) string { return "file:" + path }

// SourceStore names the source of one store key, rackwire/policies/v1/<name>
// (store.PolicyKey): each key is a source of its own, so that a put or a
// delete of one key touches only that policy.
func SourceStore(name string) string { return "store:" + name }

// DecodeStoreValue loads the value of the store key of policy name: exactly
// one policy document whose metadata.name is name.
func DecodeStoreValue(name string, value []byte) (Policy, error) {
	ps, err := Load("store key policies/v1/"+name, value)
	if err != nil {
		return Policy{}, err
	}
	if len(ps) != 1 {
		return Policy{}, fmt.Errorf("store key policies/v1/%s: %w: holds %d policies, want exactly one", name, ErrInvalid, len(ps))
	}
	if ps[0].Metadata.Name != name {
		return Policy{}, fmt.Errorf("store key policies/v1/%s: %w: holds policy %q; the key must be the policy's name", name, ErrInvalid, ps[0].Metadata.Name)
	}
	return ps[0], nil
}

// EncodeStoreValue is the value `rackwire policy import` writes under
// store.PolicyKey(p.Metadata.Name): the policy as a JSON document, which
// DecodeStoreValue reads back.
func EncodeStoreValue(p Policy) ([]byte, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encode policy %q: %w", p.Metadata.Name, err)
	}
	return b, nil
}
