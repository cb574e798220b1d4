package backoff

import (
	"context"
	"testing"
	"time"
)

func TestJitterBounds(t *testing.T) {
	for range 1000 {
		if d := Jitter(time.Second); d < 800*time.Millisecond || d >= 1200*time.Millisecond {
			t.Fatalf("Jitter(1s) = %v, want within [0.8s, 1.2s)", d)
		}
	}
}

func TestBackoffDoublesToCapAndResets(t *testing.T) {
	b := New(time.Second, 8*time.Second)
	for i, want := range []time.Duration{1, 2, 4, 8, 8} {
		want *= time.Second
		if d := b.Next(); d < want*8/10 || d >= want*12/10 {
			t.Errorf("step %d: Next() = %v, want %v ±20%%", i, d, want)
		}
	}
	b.Reset()
	if d := b.Next(); d >= 1200*time.Millisecond {
		t.Errorf("after Reset, Next() = %v, want about 1s", d)
	}
}

func TestSleepCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) {
		t.Errorf("Sleep on a cancelled context reported the full wait")
	}
	if !Sleep(context.Background(), time.Millisecond) {
		t.Errorf("Sleep(1ms) reported a cancellation")
	}
}
