package policy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// Errors wrapped by every *LoadError, for errors.Is.
var (
	// ErrUnsupported: a field rackwire knows but does not implement (L7
	// rules, toFQDNs, toServices, toGroups, ...).
	ErrUnsupported = errors.New("not supported")
	// ErrUnknownField: a field that is not part of the vocabulary.
	ErrUnknownField = errors.New("unknown field")
	// ErrInvalid: a field with a bad value.
	ErrInvalid = errors.New("invalid")
)

// LoadError says which file, document and field made a load fail.
type LoadError struct {
	File  string // as given to Load; "" for data without a file
	Doc   int    // 1-based position of the YAML document in the stream; 0 if unknown
	Name  string // metadata.name when it could be read
	Field string // dotted path of the field, e.g. spec.ingress[0].toFQDNs
	Err   error
}

func (e *LoadError) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(": ")
	}
	if e.Doc > 0 {
		fmt.Fprintf(&b, "document %d", e.Doc)
		if e.Name != "" {
			fmt.Fprintf(&b, " (%q)", e.Name)
		}
		b.WriteString(": ")
	}
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Err.Error())
	return b.String()
}

func (e *LoadError) Unwrap() error { return e.Err }

// fieldError is an error at a field path inside one policy document.
type fieldError struct {
	field string
	err   error
}

func (e *fieldError) Error() string { return e.field + ": " + e.err.Error() }
func (e *fieldError) Unwrap() error { return e.err }

func errAt(field string, sentinel error, format string, args ...any) error {
	return &fieldError{field: field, err: fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)}
}

// unsupported lists fields of the Cilium vocabulary rackwire refuses, with
// the reason given to the operator.
var unsupported = map[string]string{
	"rules":             "L7 rules (http, dns, kafka) are not supported; rackwire enforces L3/L4 only",
	"toFQDNs":           "DNS-name rules (toFQDNs) are not supported; use toCIDR/toCIDRSet",
	"toServices":        "toServices is not supported; select the backends with toEndpoints or toCIDR",
	"toGroups":          "toGroups is not supported; use toCIDR/toCIDRSet",
	"fromGroups":        "fromGroups is not supported; use fromCIDR/fromCIDRSet",
	"toRequires":        "toRequires is not supported",
	"fromRequires":      "fromRequires is not supported",
	"toNodes":           "toNodes is not supported; use toEntities: [remote-node] or toCIDR",
	"fromNodes":         "fromNodes is not supported; use fromEntities: [remote-node] or fromCIDR",
	"nodeSelector":      "host policies (nodeSelector) are not supported",
	"authentication":    "mutual authentication is not supported",
	"terminatingTLS":    "TLS interception is not supported",
	"originatingTLS":    "TLS interception is not supported",
	"serverNames":       "TLS server-name rules are not supported",
	"listener":          "Envoy listeners are not supported",
	"cidrGroupRef":      "CIDR groups are not supported; list the prefixes",
	"enableDefaultDeny": "enableDefaultDeny is not supported; a selected direction is always default-deny",
	"namespace":         "namespaces are not supported: rackwire has none, selectors match labels only; remove metadata.namespace",
	"labels":            "rule labels are not supported",
	"log":               "policy logging is not supported",
	"l7Proto":           "L7 rules are not supported; rackwire enforces L3/L4 only",
}

// Load parses a YAML or JSON policy file: one document, a stream of
// documents separated by "---", a JSON array, or a `kind: List` with items.
// It returns every policy of the file or, if any document is bad, none and a
// *LoadError. file names the data in errors and may be "".
func Load(file string, data []byte) ([]Policy, error) {
	var out []Policy
	names := map[string]int{}
	for i, doc := range splitDocuments(data) {
		ps, err := loadDocument(doc)
		if err != nil {
			le := &LoadError{File: file, Doc: i + 1}
			var de *docError
			if errors.As(err, &de) {
				le.Name, err = de.name, de.err
			}
			var fe *fieldError
			if errors.As(err, &fe) {
				le.Field, le.Err = fe.field, fe.err
			} else {
				le.Err = err
			}
			return nil, le
		}
		for _, p := range ps {
			if prev, dup := names[p.Metadata.Name]; dup {
				return nil, &LoadError{File: file, Doc: i + 1, Name: p.Metadata.Name, Field: "metadata.name",
					Err: fmt.Errorf("%w: name %q is also used by document %d; names must be unique", ErrInvalid, p.Metadata.Name, prev)}
			}
			names[p.Metadata.Name] = i + 1
		}
		out = append(out, ps...)
	}
	return out, nil
}

// LoadFile reads and loads one file.
func LoadFile(path string) ([]Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read policy file: %w", err)
	}
	return Load(path, data)
}

// FileResult is the outcome of loading one file of a directory.
type FileResult struct {
	Path     string
	Policies []Policy
	Err      error // a bad file loads nothing
}

// LoadDir loads every *.yaml, *.yml and *.json file of dir, in name order.
// Each file loads completely or not at all (FileResult.Err); the error
// return is for a directory that cannot be read. A missing directory holds
// no files.
func LoadDir(dir string) ([]FileResult, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read policy directory: %w", err)
	}
	var out []FileResult
	for _, e := range ents {
		ext := strings.ToLower(filepath.Ext(e.Name()))
		if e.IsDir() || (ext != ".yaml" && ext != ".yml" && ext != ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		ps, err := LoadFile(p)
		out = append(out, FileResult{Path: p, Policies: ps, Err: err})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

// splitDocuments cuts a YAML stream at "---" lines. A JSON document has no
// such line and stays whole.
func splitDocuments(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), len(data)+1)
	for sc.Scan() {
		line := sc.Bytes()
		if isSeparator(line) {
			docs = append(docs, bytes.Clone(cur.Bytes()))
			cur.Reset()
			// "--- {a: b}": content may follow the marker on its line.
			if rest := bytes.TrimSpace(line[3:]); line[0] == '-' && len(rest) > 0 && rest[0] != '#' {
				cur.Write(rest)
				cur.WriteByte('\n')
			}
			continue
		}
		cur.Write(line)
		cur.WriteByte('\n')
	}
	docs = append(docs, cur.Bytes())
	return docs
}

func isSeparator(line []byte) bool {
	if !bytes.HasPrefix(line, []byte("---")) && !bytes.HasPrefix(line, []byte("...")) {
		return false
	}
	rest := bytes.TrimRight(line[3:], " \t\r")
	return len(rest) == 0 || rest[0] == '#' || (line[0] == '-' && (rest[0] == ' ' || rest[0] == '\t'))
}

type docError struct {
	name string
	err  error
}

func (e *docError) Error() string { return e.err.Error() }
func (e *docError) Unwrap() error { return e.err }

// loadDocument decodes one YAML document into zero or more policies.
func loadDocument(doc []byte) ([]Policy, error) {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, fmt.Errorf("%w: not valid YAML or JSON: %v", ErrInvalid, err)
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("%w: not valid YAML or JSON: %v", ErrInvalid, err)
	}
	switch t := v.(type) {
	case nil:
		return nil, nil // empty document (comments only)
	case []any:
		return loadItems(t, "")
	case map[string]any:
		kind, _ := t["kind"].(string)
		if kind == "List" || kind == "CiliumNetworkPolicyList" {
			for k := range t {
				if k != "apiVersion" && k != "kind" && k != "items" && k != "metadata" {
					return nil, errAt(k, ErrUnknownField, "a %s holds apiVersion, kind and items only", kind)
				}
			}
			items, ok := t["items"].([]any)
			if !ok {
				return nil, errAt("items", ErrInvalid, "a %s needs an items array", kind)
			}
			return loadItems(items, "items")
		}
		p, err := loadObject(t, "")
		if err != nil {
			return nil, err
		}
		return []Policy{p}, nil
	default:
		return nil, fmt.Errorf("%w: a document must be a policy object, a list of them or a kind: List", ErrInvalid)
	}
}

func loadItems(items []any, prefix string) ([]Policy, error) {
	var out []Policy
	for i, it := range items {
		m, ok := it.(map[string]any)
		path := fmt.Sprintf("%s[%d]", prefix, i)
		if !ok {
			return nil, errAt(path, ErrInvalid, "a list item must be a policy object")
		}
		p, err := loadObject(m, path+".")
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// loadObject checks one policy object field by field, decodes it and
// validates it by compiling it.
func loadObject(m map[string]any, prefix string) (Policy, error) {
	name := ""
	if md, ok := m["metadata"].(map[string]any); ok {
		name, _ = md["name"].(string)
	}
	wrap := func(err error) error { return &docError{name: name, err: err} }
	if err := checkFields(m, reflect.TypeOf(Policy{}), strings.TrimSuffix(prefix, ".")); err != nil {
		return Policy{}, wrap(err)
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return Policy{}, wrap(fmt.Errorf("%w: re-encode: %v", ErrInvalid, err))
	}
	var p Policy
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return Policy{}, wrap(errAt(prefix+te.Field, ErrInvalid, "is %s, want %s", te.Value, typeName(te.Type)))
		}
		return Policy{}, wrap(fmt.Errorf("%w: decode: %v", ErrInvalid, err))
	}
	if _, err := compile("", &p); err != nil {
		var fe *fieldError
		if prefix != "" && errors.As(err, &fe) {
			fe.field = prefix + fe.field
		}
		return Policy{}, wrap(err)
	}
	return p, nil
}

func typeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Slice:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.String:
		return "a string"
	case reflect.Int32, reflect.Int, reflect.Int64, reflect.Uint16, reflect.Uint8:
		return "an integer"
	}
	return t.String()
}

var unmarshalerType = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()

// checkFields walks a decoded document alongside the Go type it must decode
// into and refuses the first unknown or unsupported field, naming its path.
func checkFields(v any, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if v == nil {
		return nil // null: the zero value
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		switch n := v.(type) {
		case string:
		case json.Number:
			if _, err := n.Int64(); err != nil {
				return errAt(path, ErrInvalid, "%s is not an integer", n)
			}
		default:
			return errAt(path, ErrInvalid, "want a number or a string")
		}
		return nil
	}
	join := func(k string) string {
		if path == "" {
			return k
		}
		return path + "." + k
	}
	switch t.Kind() {
	case reflect.String:
		if _, ok := v.(string); !ok {
			return errAt(path, ErrInvalid, "want a string")
		}
	case reflect.Int32:
		n, ok := v.(json.Number)
		if !ok {
			return errAt(path, ErrInvalid, "want an integer")
		}
		if _, err := strconv.ParseInt(string(n), 10, 32); err != nil {
			return errAt(path, ErrInvalid, "%s is not an integer in range", n)
		}
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return errAt(path, ErrInvalid, "want an object")
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			f, ok := fieldByTag(t, k)
			if !ok {
				if why, ok := unsupported[k]; ok {
					return errAt(join(k), ErrUnsupported, "%s", why)
				}
				return errAt(join(k), ErrUnknownField, "%q is not part of the supported policy language (check spelling and case)", k)
			}
			if err := checkFields(m[k], f.Type, join(k)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		s, ok := v.([]any)
		if !ok {
			return errAt(path, ErrInvalid, "want a list")
		}
		for i, e := range s {
			if err := checkFields(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return errAt(path, ErrInvalid, "want an object")
		}
		for k, e := range m {
			if _, ok := e.(string); !ok && t.Elem().Kind() == reflect.String {
				return errAt(join(k), ErrInvalid, "want a string (quote values such as \"true\" or \"80\")")
			}
		}
	}
	return nil
}

func fieldByTag(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == key && name != "-" {
			return f, true
		}
	}
	return reflect.StructField{}, false
}
