package consultest

import (
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDiedReportsAnExitNobodyAskedFor: an agent killed from outside (as
// the kernel's OOM killer did to two fleet servers) is reported by Died;
// one stopped through Kill is not.
func TestDiedReportsAnExitNobodyAskedFor(t *testing.T) {
	a := Start(t)
	b := Start(t)
	pid := a.Pid()
	if pid == 0 || a.Died() != "" {
		t.Fatalf("running agent: pid %d, died %q", pid, a.Died())
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for a.Died() == "" {
		if time.Now().After(deadline) {
			t.Fatal("a consul killed from outside is not reported by Died after 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if d := a.Died(); !strings.Contains(d, "exited by itself") || !strings.Contains(d, "signal: killed") {
		t.Fatalf("Died = %q", d)
	}
	if a.Pid() != 0 {
		t.Fatalf("Pid after death = %d", a.Pid())
	}
	a.Kill() // must not hang on a reaped process
	b.Kill()
	if d := b.Died(); d != "" {
		t.Fatalf("an agent stopped by Kill reports Died = %q", d)
	}
}
