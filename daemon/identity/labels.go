package identity

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// ErrBadLabels is wrapped by every label parsing error.
var ErrBadLabels = errors.New("bad labels")

// Label is one key=value pair. Keys carry no source prefix: "k8s:app" and
// "any:app" are both "app" here (the policy loader maps them).
type Label struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Labels is a set of labels, sorted by key, keys unique. The zero value is
// the empty set. Build one with NewLabels or ParseLabels, never by hand.
type Labels []Label

const (
	maxKeyLen   = 253
	maxValueLen = 253
	maxLabels   = 64
)

// NewLabels builds a Labels from a map.
func NewLabels(m map[string]string) (Labels, error) {
	ls := make(Labels, 0, len(m))
	for k, v := range m {
		if err := checkLabel(k, v); err != nil {
			return nil, err
		}
		ls = append(ls, Label{Key: k, Value: v})
	}
	if len(ls) > maxLabels {
		return nil, fmt.Errorf("%w: %d labels, at most %d", ErrBadLabels, len(ls), maxLabels)
	}
	sort.Slice(ls, func(i, j int) bool { return ls[i].Key < ls[j].Key })
	return ls, nil
}

// MustLabels is NewLabels for tests and constants; it panics on bad input.
func MustLabels(kv ...string) Labels {
	if len(kv)%2 != 0 {
		panic("MustLabels: odd number of arguments")
	}
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	ls, err := NewLabels(m)
	if err != nil {
		panic(err)
	}
	return ls
}

// ParseLabels parses the CLI form "k1=v1,k2=v2". A key without "=" has the
// empty value. Duplicated keys are an error.
func ParseLabels(s string) (Labels, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Labels{}, nil
	}
	m := map[string]string{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return nil, fmt.Errorf("%w: empty label in %q; write k1=v1,k2=v2", ErrBadLabels, s)
		}
		k, v, _ := strings.Cut(part, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("%w: label %q given twice", ErrBadLabels, k)
		}
		m[k] = v
	}
	return NewLabels(m)
}

// ParseCanonical parses the store form "k1=v1;k2=v2;" written by String.
func ParseCanonical(s string) (Labels, error) {
	if s == "" {
		return Labels{}, nil
	}
	if !strings.HasSuffix(s, ";") {
		return nil, fmt.Errorf("%w: canonical labels %q do not end in ';'", ErrBadLabels, truncate(s))
	}
	m := map[string]string{}
	for _, part := range strings.Split(strings.TrimSuffix(s, ";"), ";") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return nil, fmt.Errorf("%w: %q has no '='", ErrBadLabels, truncate(part))
		}
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("%w: label %q given twice", ErrBadLabels, truncate(k))
		}
		m[k] = v
	}
	ls, err := NewLabels(m)
	if err != nil {
		return nil, err
	}
	if ls.String() != s {
		return nil, fmt.Errorf("%w: %q is not in canonical order", ErrBadLabels, truncate(s))
	}
	return ls, nil
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

func checkLabel(k, v string) error {
	if k == "" || len(k) > maxKeyLen {
		return fmt.Errorf("%w: key %q must be 1..%d characters", ErrBadLabels, truncate(k), maxKeyLen)
	}
	if len(v) > maxValueLen {
		return fmt.Errorf("%w: value of %q is longer than %d characters", ErrBadLabels, truncate(k), maxValueLen)
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-/:", r)) {
			return fmt.Errorf("%w: key %q has %q; only letters, digits and the characters . _ - / : are allowed", ErrBadLabels, truncate(k), r)
		}
	}
	for _, r := range v {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-/:", r)) {
			return fmt.Errorf("%w: value %q of %q has %q; only letters, digits and the characters . _ - / : are allowed", ErrBadLabels, truncate(v), truncate(k), r)
		}
	}
	return nil
}

// String is the canonical form stored in the store: "k1=v1;k2=v2;".
func (ls Labels) String() string {
	var b strings.Builder
	for _, l := range ls {
		b.WriteString(l.Key)
		b.WriteByte('=')
		b.WriteString(l.Value)
		b.WriteByte(';')
	}
	return b.String()
}

// CLI is the "k1=v1,k2=v2" form the CLI reads and prints.
func (ls Labels) CLI() string {
	parts := make([]string, len(ls))
	for i, l := range ls {
		parts[i] = l.Key + "=" + l.Value
	}
	return strings.Join(parts, ",")
}

// Get returns the value of key and whether it is present.
func (ls Labels) Get(key string) (string, bool) {
	i := sort.Search(len(ls), func(i int) bool { return ls[i].Key >= key })
	if i < len(ls) && ls[i].Key == key {
		return ls[i].Value, true
	}
	return "", false
}

// Equal reports whether two label sets are the same.
func (ls Labels) Equal(o Labels) bool { return ls.String() == o.String() }

// Filter keeps the identity-relevant labels: those whose key is in keys or
// matches a "prefix*" entry. An empty filter keeps all.
func (ls Labels) Filter(keys []string) Labels {
	if len(keys) == 0 {
		return ls
	}
	out := Labels{}
	for _, l := range ls {
		for _, k := range keys {
			if k == l.Key || (strings.HasSuffix(k, "*") && strings.HasPrefix(l.Key, strings.TrimSuffix(k, "*"))) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}
