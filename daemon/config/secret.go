package config

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
)

// Secrets never live in the config: [store] token_file and [bgp.peers]
// password_file name the files that hold them, so a Config can be printed
// (check-config), served and logged as it is.

// CheckTokenFile reports why path cannot hold an ACL token: it does not
// exist, cannot be read, or is open to group or others. The error says
// what to run. The agent checks it when it loads the config and again
// when the Consul client reads the token.
func CheckTokenFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cannot read %s: %v; the file must exist and be readable by the agent", path, unwrapPathErr(err))
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("cannot stat %s: %v", path, unwrapPathErr(err))
	}
	if st.IsDir() {
		return fmt.Errorf("%s is a directory; write the path of the file that holds the token", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s is open to group or others (mode %04o) and holds a secret; run `chmod 600 %s`", path, perm, path)
	}
	return nil
}

// LoopbackAddress reports whether hostport ("host:port") names this host's
// loopback: 127.0.0.0/8, ::1 or "localhost". Traffic to it never leaves
// the host.
func LoopbackAddress(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

// validateConsulTransport checks that the Consul ACL token and the TLS
// settings mean what they say: no token in clear text over the network
// unless allow_insecure says so, no TLS files that scheme = "http" would
// silently ignore, and a token file only the agent can read.
func (c *Config) validateConsulTransport(bad func(key, format string, args ...any)) {
	s := &c.Store
	if s.Scheme == "http" {
		for _, f := range []struct{ key, v string }{
			{"store.tls_ca_file", s.TLSCAFile}, {"store.tls_cert_file", s.TLSCertFile}, {"store.tls_key_file", s.TLSKeyFile},
		} {
			if f.v != "" {
				bad(f.key, "TLS files are set but scheme = \"http\" talks to Consul in clear text and ignores them; set scheme = \"https\"")
				break
			}
		}
		if _, _, err := net.SplitHostPort(s.Address); err == nil && s.TokenFile != "" && !s.AllowInsecure && !LoopbackAddress(s.Address) {
			bad("store.token_file", "the ACL token would cross the network in clear text (scheme = \"http\" to %s, which is not loopback); "+
				"set scheme = \"https\" (with tls_ca_file), or use the local Consul agent (address = \"127.0.0.1:8500\"), "+
				"or set allow_insecure = true if this network is trusted", s.Address)
		}
	}
	if s.TokenFile != "" && strings.HasPrefix(s.TokenFile, "/") {
		if err := CheckTokenFile(s.TokenFile); err != nil {
			bad("store.token_file", "%s", err.Error())
		}
	}
}
