package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// MaxFileSize bounds the config file; a real one is a few KiB.
const MaxFileSize = 1 << 20

// ErrInvalid is wrapped by every error Load and Validate return for a file
// that was read but is wrong.
var ErrInvalid = errors.New("invalid config")

// Problem is one thing wrong with a config file.
type Problem struct {
	File string
	Line int    // 0 when the problem has no single line
	Key  string // dotted key, e.g. "store.adress" or "bgp.peers[1].asn"
	Msg  string
}

func (p Problem) String() string {
	var b strings.Builder
	b.WriteString(p.File)
	if p.Line > 0 {
		fmt.Fprintf(&b, ":%d", p.Line)
	}
	b.WriteString(": ")
	if p.Key != "" {
		b.WriteString(p.Key)
		b.WriteString(": ")
	}
	b.WriteString(p.Msg)
	return b.String()
}

// Error lists every problem found in one file.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Unwrap makes errors.Is(err, ErrInvalid) true.
func (e *Error) Unwrap() error { return ErrInvalid }

// Load reads, decodes and validates the file at path over the defaults. It
// never returns a partially valid config: on any problem the error lists
// them all, each with FILE:LINE.
func Load(path string) (Config, error) {
	data, err := readBounded(path)
	if err != nil {
		return Config{}, err
	}
	return Parse(path, data)
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("read config: %s does not exist; write one (see /usr/share/doc/rackwire/rackwire.toml.example) or pass --config PATH", path)
		}
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("read config: %s: permission denied; run as root or make it readable by the agent", path)
		}
		return nil, fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("read config: %s is a directory; pass the path of the TOML file, e.g. %s", path, DefaultPath)
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read config %s: %w", path, err)
	}
	if len(data) > MaxFileSize {
		return nil, &Error{Problems: []Problem{{File: path, Msg: fmt.Sprintf("file is larger than %d bytes; a rackwire config is a few KiB, is this the right file?", MaxFileSize)}}}
	}
	return data, nil
}

// Parse decodes and validates data as the contents of file.
func Parse(file string, data []byte) (cfg Config, err error) {
	// The decoder is well tested, but a config must never crash the agent.
	defer func() {
		if r := recover(); r != nil {
			cfg = Config{}
			err = &Error{Problems: []Problem{{File: file, Msg: fmt.Sprintf("cannot parse: %v", r)}}}
		}
	}()
	if len(bytes.TrimSpace(data)) == 0 {
		return Config{}, &Error{Problems: []Problem{{File: file, Line: 1, Msg: "file is empty; it needs at least `version = 1` (see rackwire.toml.example)"}}}
	}
	if !utf8Valid(data) {
		return Config{}, &Error{Problems: []Problem{{File: file, Msg: "file is not UTF-8 text; is this the right file?"}}}
	}
	cfg = Default()
	// Slices in the defaults would be appended to by the decoder; the file
	// replaces them instead.
	cfg.Node.Addresses, cfg.IPAM.CIDRs, cfg.Datapath.IdentityLabels = nil, nil, nil
	cfg.BGP.VIPs, cfg.BGP.Import = nil, nil
	md, derr := toml.NewDecoder(bytes.NewReader(data)).Decode(&cfg)
	if derr != nil {
		return Config{}, &Error{Problems: []Problem{decodeProblem(file, derr)}}
	}
	lines := indexLines(data)
	var probs []Problem
	for _, k := range md.Undecoded() {
		key := k.String()
		probs = append(probs, Problem{File: file, Line: lines.find(key), Key: key, Msg: unknownKeyMsg(key)})
	}
	def := Default()
	if !md.IsDefined("node", "addresses") {
		cfg.Node.Addresses = def.Node.Addresses
	}
	if !md.IsDefined("ipam", "cidrs") {
		cfg.IPAM.CIDRs = def.IPAM.CIDRs
	}
	if !md.IsDefined("datapath", "identity_labels") {
		cfg.Datapath.IdentityLabels = def.Datapath.IdentityLabels
	}
	if !md.IsDefined("bgp", "vips") {
		cfg.BGP.VIPs = def.BGP.VIPs
	}
	if !md.IsDefined("bgp", "import") {
		cfg.BGP.Import = def.BGP.Import
	}
	cfg.File = file
	for _, p := range cfg.validate() {
		p.File = file
		p.Line = lines.find(p.Key)
		probs = append(probs, p)
	}
	if len(probs) > 0 {
		sort.SliceStable(probs, func(i, j int) bool { return probs[i].Line < probs[j].Line })
		return Config{}, &Error{Problems: probs}
	}
	return cfg, nil
}

func utf8Valid(b []byte) bool {
	return !bytes.ContainsRune(b, 0) && strings.ToValidUTF8(string(b), "\uFFFD") == string(b)
}

func decodeProblem(file string, err error) Problem {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		msg := pe.Message
		if pe.Usage != "" {
			msg += "; " + strings.TrimSpace(strings.ReplaceAll(pe.Usage, "\n", " "))
		}
		if strings.Contains(msg, "incompatible types") || strings.Contains(msg, "cannot decode") {
			msg += "; see rackwire.toml.example for the type of each key"
		}
		return Problem{File: file, Line: pe.Position.Line, Key: pe.LastKey, Msg: msg}
	}
	// Type errors come as "toml: line N (last key "k"): msg".
	if m := reTypeErr.FindStringSubmatch(err.Error()); m != nil {
		line, _ := strconv.Atoi(m[1])
		msg := m[3]
		if strings.Contains(msg, "incompatible types") {
			msg += "; see rackwire.toml.example for the type of each key"
		}
		return Problem{File: file, Line: line, Key: m[2], Msg: msg}
	}
	return Problem{File: file, Msg: strings.TrimPrefix(err.Error(), "toml: ")}
}

var reTypeErr = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

// known lists every key path the config accepts, for "did you mean".
func known() []string {
	return []string{
		"version",
		"node.name", "node.cluster", "node.cluster_id", "node.addresses",
		"agent.state_dir", "agent.socket", "agent.socket_group", "agent.admin_group",
		"ipam.cidrs",
		"store.backend", "store.path", "store.address", "store.scheme", "store.datacenter",
		"store.token_file", "store.tls_ca_file", "store.tls_cert_file", "store.tls_key_file",
		"store.tls_server_name", "store.prefix", "store.session_ttl", "store.list_timeout", "store.ipcache_sync", "store.ipcache_log_keep",
		"store.allow_insecure", "store.gzip",
		"datapath.pin_dir", "datapath.attach", "datapath.policy_audit_mode", "datapath.identity_labels",
		"datapath.ct_max_entries", "datapath.ct_other_max_entries",
		"datapath.ct_timeout_tcp", "datapath.ct_timeout_tcp_syn", "datapath.ct_timeout_tcp_close", "datapath.ct_timeout_other",
		"datapath.policy_max_entries", "datapath.ipcache_max_entries", "datapath.policy_dir",
		"datapath.frag_max_entries",
		"datapath.events", "datapath.events_rate", "datapath.events_burst",
		"datapath.host_routing", "datapath.uplinks",
		"datapath.service_cgroup", "datapath.service_max_entries", "datapath.service_backend_max_entries",
		"bgp.enabled", "bgp.bird_config", "bgp.bird_socket", "bgp.bird_binary", "bgp.router_id", "bgp.local_asn",
		"bgp.vips", "bgp.vip_ranges", "bgp.import", "bgp.drain_keep", "bgp.communities",
		"bgp.peers.name", "bgp.peers.address", "bgp.peers.asn", "bgp.peers.source_address", "bgp.peers.multihop",
		"bgp.peers.bfd", "bgp.peers.bfd_min_rx", "bgp.peers.bfd_min_tx", "bgp.peers.bfd_multiplier",
		"bgp.peers.graceful_restart", "bgp.peers.hold_time", "bgp.peers.keepalive_time", "bgp.peers.password_file",
		"bgp.peers.communities", "bgp.peers.local_pref",
		"bgp.vip_health.vip", "bgp.vip_health.type", "bgp.vip_health.target", "bgp.vip_health.path",
		"bgp.vip_health.interval", "bgp.vip_health.timeout", "bgp.vip_health.rise", "bgp.vip_health.fall",
		"bgp.vip_health.communities", "bgp.vip_health.local_pref", "bgp.announce_service_vips",
		"services.name", "services.vip", "services.port", "services.protocol", "services.backends",
		"restart.fleet_size", "restart.jitter_window", "restart.backoff_min", "restart.backoff_max",
		"metrics.listen",
		"log.level", "log.format",
		"docker.enabled", "docker.socket", "docker.engine_socket",
	}
}

func unknownKeyMsg(key string) string {
	best, bestD := "", 1<<30
	for _, k := range known() {
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	msg := "unknown key"
	if bestD <= 3 {
		msg += fmt.Sprintf("; did you mean %q?", best)
	} else {
		msg += "; remove it (the valid keys are listed in rackwire.toml.example)"
	}
	return msg
}

func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return 1 << 20
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := 1
			if a[i-1] == b[j-1] {
				c = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+c)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// lineIndex maps dotted key paths to the line that sets them. Array tables
// are indexed ("bgp.peers[1].asn"); a key that is not found maps to the line
// of its closest parent that is.
type lineIndex map[string]int

func indexLines(data []byte) lineIndex {
	idx := lineIndex{}
	table := ""
	counts := map[string]int{}
	for i, raw := range strings.Split(string(data), "\n") {
		ln := i + 1
		line := strings.TrimSpace(raw)
		if line == "" || line[0] == '#' {
			continue
		}
		switch {
		case strings.HasPrefix(line, "[["):
			name := cleanKey(strings.TrimSuffix(strings.TrimSpace(strings.SplitN(line[2:], "]]", 2)[0]), "]"))
			n := counts[name]
			counts[name] = n + 1
			table = fmt.Sprintf("%s[%d]", name, n)
			setOnce(idx, table, ln)
			setOnce(idx, name, ln)
		case line[0] == '[':
			name := cleanKey(strings.SplitN(line[1:], "]", 2)[0])
			table = name
			setOnce(idx, table, ln)
		default:
			eq := strings.IndexByte(line, '=')
			if eq <= 0 {
				continue
			}
			key := cleanKey(line[:eq])
			full := key
			if table != "" {
				full = table + "." + key
			}
			setOnce(idx, full, ln)
			// Also under the unindexed name, which is how the decoder's
			// metadata names keys of array tables.
			setOnce(idx, unindex(full), ln)
		}
	}
	return idx
}

func setOnce(m lineIndex, k string, v int) {
	if _, ok := m[k]; !ok {
		m[k] = v
	}
}

func cleanKey(s string) string {
	parts := strings.Split(s, ".")
	for i, p := range parts {
		parts[i] = strings.Trim(strings.TrimSpace(p), `"'`)
	}
	return strings.Join(parts, ".")
}

func unindex(k string) string {
	var b strings.Builder
	skip := false
	for _, r := range k {
		switch {
		case r == '[':
			skip = true
		case r == ']':
			skip = false
		case !skip:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func (l lineIndex) find(key string) int {
	for key != "" {
		if n, ok := l[key]; ok {
			return n
		}
		// bgp.peers[1].asn → bgp.peers[1] → bgp.peers → bgp
		if i := strings.LastIndexAny(key, ".["); i > 0 {
			key = key[:i]
			continue
		}
		break
	}
	return 0
}

// itoa keeps validate.go free of strconv noise.
func itoa(i int) string { return strconv.Itoa(i) }
