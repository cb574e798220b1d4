// Package birdtest starts real BIRD daemons and network namespaces for the
// tests of birdconf and daemon/bgp. Only tests import it.
//
// Everything it creates (namespaces, veth links, bird processes) is removed
// by t.Cleanup, also when the test fails; processes are stopped by pid.
package birdtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// Run runs a command and fails the test with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NetNS creates network namespace name with lo up and deletes it at
// cleanup. A leftover of an earlier run with the same name is removed first.
func NetNS(t testing.TB, name string) string {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	exec.Command("ip", "netns", "del", name).Run()
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// Veth links namespace a (interface ifA, address addrA as a prefix) with
// namespace b (ifB, addrB).
func Veth(t testing.TB, a, ifA, addrA, b, ifB, addrB string) {
	t.Helper()
	Run(t, "ip", "link", "add", ifA, "netns", a, "type", "veth", "peer", "name", ifB, "netns", b)
	Run(t, "ip", "-n", a, "addr", "add", addrA, "dev", ifA)
	Run(t, "ip", "-n", b, "addr", "add", addrB, "dev", ifB)
	Run(t, "ip", "-n", a, "link", "set", ifA, "up")
	Run(t, "ip", "-n", b, "link", "set", ifB, "up")
}

// Bird is one running bird process.
type Bird struct {
	Config string // the file it was started with
	Socket string
	cmd    *exec.Cmd
	done   chan struct{}
}

// Start writes conf to dir/bird.conf and runs bird in the foreground in
// namespace ns ("" for the current one), stopped by pid at cleanup. It
// returns once the control socket answers.
func Start(t testing.TB, ns, dir, conf string) *Bird {
	t.Helper()
	bin := testenv.RequireCommand(t, "bird")
	b := &Bird{
		Config: filepath.Join(dir, "bird.conf"),
		Socket: filepath.Join(dir, "bird.ctl"),
		done:   make(chan struct{}),
	}
	if err := os.WriteFile(b.Config, []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	args := []string{bin, "-f", "-c", b.Config, "-s", b.Socket, "-P", filepath.Join(dir, "bird.pid")}
	if ns != "" {
		args = append([]string{"ip", "netns", "exec", ns}, args...)
	}
	b.cmd = exec.Command(args[0], args[1:]...)
	log, err := os.Create(filepath.Join(dir, "bird.log"))
	if err != nil {
		t.Fatal(err)
	}
	b.cmd.Stdout, b.cmd.Stderr = log, log
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("start bird: %v", err)
	}
	go func() { b.cmd.Wait(); log.Close(); close(b.done) }()
	t.Cleanup(b.Stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-b.done:
			out, _ := os.ReadFile(filepath.Join(dir, "bird.log"))
			t.Fatalf("bird exited at start: %s", out)
		default:
		}
		if c, err := net.Dial("unix", b.Socket); err == nil {
			c.Close()
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("bird control socket %s did not appear", b.Socket)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop terminates the process by pid and waits for it (idempotent).
func (b *Bird) Stop() {
	select {
	case <-b.done:
		return
	default:
	}
	b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(5 * time.Second):
		b.cmd.Process.Kill()
		<-b.done
	}
}

// Pid is the process id of bird.
func (b *Bird) Pid() int { return b.cmd.Process.Pid }

func (b *Bird) String() string { return fmt.Sprintf("bird pid %d (%s)", b.Pid(), b.Socket) }
