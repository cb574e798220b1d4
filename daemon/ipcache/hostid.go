package ipcache

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/rackwire/rackwire/internal/atomicfile"
)

// HostIDFile is the file, in the agent's state directory, that holds the
// host id published as the node record's host_id (see Duplicate).
const HostIDFile = "host-id"

// LoadHostID returns the host id stored at path, creating it (32 random
// hex digits, written atomically) when the file is missing. The id
// survives restarts and upgrades; it changes only when the state directory
// is wiped, which is what a reinstalled host is. A file that does not hold
// a valid id is an error, not replaced: a silently new id would make this
// host look like another one under its own name.
func LoadHostID(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if !validHostID(id) {
			return "", fmt.Errorf("host id file %s does not hold 32 hex digits; remove it to create a new id", path)
		}
		return id, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("read host id: %w", err)
	}
	id := NewHostID()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("create the directory of the host id: %w", err)
	}
	if err := atomicfile.Write(path, []byte(id+"\n"), atomicfile.Options{Mode: 0o644}); err != nil {
		return "", fmt.Errorf("write host id: %w", err)
	}
	return id, nil
}

// NewHostID returns a random host id: 32 lower-case hex digits.
func NewHostID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

func validHostID(id string) bool {
	if len(id) != 32 {
		return false
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
