package consul

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/consultest"
)

// TestElectorWaitersHoldNoSession: hosts that wait for a lock another
// host holds hold no session for it. With Consul's lock recipe every
// waiting host held one (renewed every 15 s, one per lock): for the two
// locks of every agent that was 9 of an idle agent's 10 requests a minute
// and 3 session creates per start (docs/scale.md). When the leader
// resigns, one waiter leads, and the lock sessions are again one.
func TestElectorWaitersHoldNoSession(t *testing.T) {
	a := consultest.Start(t)
	lockSessions := func() int {
		t.Helper()
		ss, _, err := newTestStore(t, a.HTTPAddr, "host-count", time.Minute).client.Session().List(nil)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, s := range ss {
			if strings.HasPrefix(s.Name, "rackwire-lock:") {
				n++
			}
		}
		return n
	}
	leader := newTestStore(t, a.HTTPAddr, "host-lead", time.Second).Elector("locks/wait")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := leader.Lead(ctx); err != nil {
		t.Fatalf("first Lead: %v", err)
	}
	const waiters = 5
	led := make(chan *Elector, waiters)
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	for i := range waiters {
		e := newTestStore(t, a.HTTPAddr, fmt.Sprintf("host-wait%d", i), time.Second).Elector("locks/wait")
		e.spread = time.Second
		go func() {
			if _, err := e.Lead(wctx); err == nil {
				led <- e
			}
		}()
	}
	time.Sleep(2 * time.Second) // every waiter is in its watch
	if n := lockSessions(); n != 1 {
		t.Errorf("%d lock sessions while 1 host leads and %d wait, want 1 (the leader's)", n, waiters)
	}
	if err := leader.Resign(); err != nil {
		t.Fatal(err)
	}
	var next *Elector
	select {
	case next = <-led:
	case <-time.After(20 * time.Second):
		t.Fatal("no waiter led within 20 s of the leader's resignation")
	}
	select {
	case e := <-led:
		t.Fatalf("two waiters lead at once (%s and %s)", next.s.opts.Node, e.s.opts.Node)
	case <-time.After(3 * time.Second):
	}
	// A waiter that lost the race destroyed its session.
	deadline := time.Now().Add(10 * time.Second)
	for lockSessions() != 1 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if n := lockSessions(); n != 1 {
		t.Errorf("%d lock sessions after the new leader took over, want 1", n)
	}
	_ = next.Resign()
}

// TestElectorAfterLeaderSessionLost: a leader whose lock session is
// invalidated (a dead host: TTL expired) is replaced once Consul's lock
// delay (15 s) is over; the waiters' failed tries during the delay back
// off instead of taking a session each every few seconds.
func TestElectorAfterLeaderSessionLost(t *testing.T) {
	a := consultest.Start(t)
	ls := newTestStore(t, a.HTTPAddr, "host-dead", time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := ls.Elector("locks/dead").Lead(ctx); err != nil {
		t.Fatalf("first Lead: %v", err)
	}
	w := newTestStore(t, a.HTTPAddr, "host-next", time.Second).Elector("locks/dead")
	w.spread = time.Second
	led := make(chan error, 1)
	go func() { _, err := w.Lead(ctx); led <- err }()
	time.Sleep(time.Second)
	ss, _, err := ls.client.Session().List(nil)
	if err != nil {
		t.Fatal(err)
	}
	destroyed := 0
	for _, s := range ss {
		if s.Name == "rackwire-lock:host-dead" {
			if _, err := ls.client.Session().Destroy(s.ID, nil); err != nil {
				t.Fatal(err)
			}
			destroyed++
		}
	}
	if destroyed != 1 {
		t.Fatalf("destroyed %d lock sessions of the leader, want 1", destroyed)
	}
	start := time.Now()
	select {
	case err := <-led:
		if err != nil {
			t.Fatalf("waiter Lead: %v", err)
		}
		t.Logf("the waiter leads %s after the leader's session was destroyed", time.Since(start).Round(100*time.Millisecond))
	case <-time.After(60 * time.Second):
		t.Fatal("no new leader within 60 s of the leader's session loss")
	}
	_ = w.Resign()
}
