package main

import "sync"

// Goroutines kept for reuse, for the work that wakes make: a task's poll
// (task.go) and a relay's client side read (relay.go). Both call into
// Rust and back into Go (the netstack, WhoIs, the engine) on the
// goroutine's stack, which grows to tens of kilobytes; a goroutine started
// per wake starts small and copies its stack as it grows, several times
// per wake (Go frees a grown stack when its goroutine ends).
//
// A kept goroutine waits for work on a channel of its own; the one that
// waited least is handed the next work (its stack is the likeliest to be
// in the CPU's cache), and when none waits a new one is started. At most
// maxIdleWorkers wait at a time and the rest end: a burst of connections
// can make hundreds at once, and kept, their stacks would stay with the
// idle sessions (about 9 kB each in a 1000-session burst). Work is shared
// by all sessions, so a quiet session holds no goroutine here.

// A runner is one wake's work: it runs until there is nothing more to do.
type runner interface{ run() }

const maxIdleWorkers = 16

var workers struct {
	mu   sync.Mutex
	idle []chan runner // waiting, the latest last
}

// goRun has w run on a kept goroutine, or a new one. It never blocks, so
// it may be called from a netstack wait queue callback.
func goRun(w runner) {
	workers.mu.Lock()
	n := len(workers.idle)
	if n == 0 {
		workers.mu.Unlock()
		go worker(w)
		return
	}
	ch := workers.idle[n-1]
	workers.idle[n-1] = nil
	workers.idle = workers.idle[:n-1]
	workers.mu.Unlock()
	ch <- w // room for one: this worker was idle, so it is empty
}

func worker(w runner) {
	ch := make(chan runner, 1)
	for {
		w.run()
		workers.mu.Lock()
		if len(workers.idle) >= maxIdleWorkers {
			workers.mu.Unlock()
			return
		}
		workers.idle = append(workers.idle, ch)
		workers.mu.Unlock()
		w = <-ch
	}
}
