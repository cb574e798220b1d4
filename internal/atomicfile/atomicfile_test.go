package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteReplaces(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	if err := Write(p, []byte("one"), Options{}); err != nil {
		t.Fatal(err)
	}
	if err := Write(p, []byte("two"), Options{Mode: 0o644}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil || string(b) != "two" {
		t.Fatalf("ReadFile = %q, %v; want two", b, err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o644 {
		t.Errorf("mode = %v, want 0644", fi.Mode().Perm())
	}
	if es, _ := os.ReadDir(dir); len(es) != 1 {
		t.Errorf("directory holds %d entries, want only the file (no temporary left)", len(es))
	}
}

func TestCheckFailureKeepsOld(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bird.conf")
	if err := Write(p, []byte("good"), Options{}); err != nil {
		t.Fatal(err)
	}
	bad := errors.New("refused")
	if err := Write(p, []byte("bad"), Options{KeepOwner: true, Check: func(string) error { return bad }}); !errors.Is(err, bad) {
		t.Fatalf("Write with a failing check = %v, want %v", err, bad)
	}
	if b, _ := os.ReadFile(p); string(b) != "good" {
		t.Errorf("content after a refused write = %q, want good", b)
	}
	if es, _ := os.ReadDir(dir); len(es) != 1 {
		t.Errorf("directory holds %d entries, want 1 (temporary removed)", len(es))
	}
}

func TestWriteMissingDir(t *testing.T) {
	if err := Write(filepath.Join(t.TempDir(), "no", "such"), []byte("x"), Options{}); err == nil {
		t.Errorf("Write into a missing directory succeeded")
	}
}
