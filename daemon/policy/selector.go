package policy

import (
	"fmt"
	"sort"
	"strings"

	"github.com/rackwire/rackwire/daemon/identity"
)

type operator uint8

const (
	opIn operator = iota
	opNotIn
	opExists
	opDoesNotExist
)

// requirement is one compiled condition on a label key.
type requirement struct {
	key    string
	op     operator
	values []string // sorted, for In and NotIn
}

// selector is a compiled label selector. The zero selector (no
// requirements) matches every label set.
type selector struct {
	key      string // canonical form, equal for equal selectors
	reqs     []requirement
	reserved bool // some key is reserved:<name>
}

// normalizeKey maps the label key spellings of a policy to the keys of
// identity.Labels: "app", "any:app" and "k8s:app" are all "app";
// "reserved:host" stays as it is (the labels of reserved identities).
func normalizeKey(k string) (string, error) {
	src, rest, ok := strings.Cut(k, ":")
	if !ok {
		if k == "" {
			return "", fmt.Errorf("%w: empty label key", ErrInvalid)
		}
		return k, nil
	}
	switch src {
	case "any", "k8s":
		if rest == "" {
			return "", fmt.Errorf("%w: empty label key in %q", ErrInvalid, k)
		}
		return rest, nil
	case "reserved":
		if _, ok := identity.ReservedByName(rest); !ok {
			return "", fmt.Errorf("%w: %q names no reserved identity (host, world, unmanaged, health, init, remote-node, ingress)", ErrInvalid, k)
		}
		return k, nil
	case "cidr":
		return "", fmt.Errorf("%w: label source \"cidr\" cannot be selected with labels; use fromCIDR/toCIDR", ErrUnsupported)
	}
	return "", fmt.Errorf("%w: label source %q in %q; write app, any:app or k8s:app (or reserved:<name>)", ErrUnsupported, src, k)
}

// compileSelector compiles s; field is its path for errors.
func compileSelector(s *Selector, field string) (*selector, error) {
	out := &selector{}
	for k, v := range s.MatchLabels {
		nk, err := normalizeKey(k)
		if err != nil {
			return nil, nest(field+".matchLabels."+k, err)
		}
		out.reqs = append(out.reqs, requirement{key: nk, op: opIn, values: []string{v}})
	}
	for i, r := range s.MatchExpressions {
		f := fmt.Sprintf("%s.matchExpressions[%d]", field, i)
		nk, err := normalizeKey(r.Key)
		if err != nil {
			return nil, nest(f+".key", err)
		}
		req := requirement{key: nk}
		switch r.Operator {
		case "In":
			req.op = opIn
		case "NotIn":
			req.op = opNotIn
		case "Exists":
			req.op = opExists
		case "DoesNotExist":
			req.op = opDoesNotExist
		default:
			return nil, errAt(f+".operator", ErrInvalid, "operator %q; use In, NotIn, Exists or DoesNotExist", r.Operator)
		}
		switch req.op {
		case opIn, opNotIn:
			if len(r.Values) == 0 {
				return nil, errAt(f+".values", ErrInvalid, "operator %s needs at least one value", r.Operator)
			}
			req.values = append([]string(nil), r.Values...)
			sort.Strings(req.values)
		default:
			if len(r.Values) != 0 {
				return nil, errAt(f+".values", ErrInvalid, "operator %s takes no values", r.Operator)
			}
		}
		out.reqs = append(out.reqs, req)
	}
	parts := make([]string, len(out.reqs))
	for i, r := range out.reqs {
		parts[i] = r.String()
		if strings.HasPrefix(r.key, "reserved:") {
			out.reserved = true
		}
	}
	sort.Strings(parts)
	sort.Slice(out.reqs, func(i, j int) bool { return out.reqs[i].String() < out.reqs[j].String() })
	out.key = strings.Join(parts, ",")
	return out, nil
}

func (r requirement) String() string {
	switch r.op {
	case opIn:
		if len(r.values) == 1 {
			return r.key + "=" + r.values[0]
		}
		return r.key + " in (" + strings.Join(r.values, "|") + ")"
	case opNotIn:
		return r.key + " notin (" + strings.Join(r.values, "|") + ")"
	case opExists:
		return r.key
	default:
		return "!" + r.key
	}
}

// matches reports whether the label set satisfies every requirement.
func (s *selector) matches(ls identity.Labels) bool {
	for _, r := range s.reqs {
		v, ok := ls.Get(r.key)
		switch r.op {
		case opIn:
			if !ok || !contains(r.values, v) {
				return false
			}
		case opNotIn:
			if ok && contains(r.values, v) {
				return false
			}
		case opExists:
			if !ok {
				return false
			}
		case opDoesNotExist:
			if ok {
				return false
			}
		}
	}
	return true
}

func contains(sorted []string, v string) bool {
	i := sort.SearchStrings(sorted, v)
	return i < len(sorted) && sorted[i] == v
}

// String is the canonical form, "" for the empty selector.
func (s *selector) String() string { return s.key }
