package main

import (
	"bytes"
	"runtime"
	"testing"
	"time"
)

// goroutine IDs, from the stack trace's header: the test needs to know
// which goroutine ran a runner, and Go exposes nothing else.
func goid() string {
	var b [64]byte
	s := b[:runtime.Stack(b[:], false)]
	return string(bytes.Fields(s)[1])
}

type probe struct {
	ran     chan string // the goroutine that ran it
	release chan struct{}
}

func (p *probe) run() {
	p.ran <- goid()
	<-p.release
}

func newProbe() *probe { return &probe{ran: make(chan string, 1), release: make(chan struct{})} }

func idleWorkerCount() int {
	workers.mu.Lock()
	defer workers.mu.Unlock()
	return len(workers.idle)
}

// waitIdle waits until n workers wait for work (they park asynchronously).
func waitIdle(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for idleWorkerCount() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d workers wait for work, want %d", idleWorkerCount(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// goRun never waits for a worker to be free (it runs in the netstack's
// wait queue callbacks), and at most maxIdleWorkers stay once the work is
// done.
func TestPoolNeverBlocksAndKeepsAtMostMax(t *testing.T) {
	n := maxIdleWorkers + 8
	probes := make([]*probe, n)
	started := make(chan struct{})
	go func() {
		for i := range probes {
			probes[i] = newProbe()
			goRun(probes[i]) // every worker busy: must start another
		}
		close(started)
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("goRun blocked while every worker was busy")
	}
	seen := map[string]bool{}
	for _, p := range probes {
		seen[<-p.ran] = true
	}
	if len(seen) != n {
		t.Fatalf("%d runners ran on %d goroutines; each needed its own", n, len(seen))
	}
	for _, p := range probes {
		close(p.release)
	}
	waitIdle(t, maxIdleWorkers)
	time.Sleep(50 * time.Millisecond) // the surplus ends rather than waits
	if got := idleWorkerCount(); got != maxIdleWorkers {
		t.Fatalf("%d workers wait after the burst, want %d", got, maxIdleWorkers)
	}
}

// The worker that waited least takes the next work: its stack has grown
// already (the point of keeping it) and is the likeliest in the cache.
func TestPoolReusesTheLatestWorker(t *testing.T) {
	before := idleWorkerCount()
	a := newProbe()
	goRun(a)
	first := <-a.ran
	close(a.release)
	waitIdle(t, max(before, 1)) // a's worker waits again
	b := newProbe()
	goRun(b)
	if got := <-b.ran; got != first {
		t.Fatalf("work went to goroutine %s, not %s, which had just finished", got, first)
	}
	close(b.release)
}
