package main

/*
#include "tsffi.h"

// cgo cannot call a C function pointer directly.
static int call_poll(tsffi_poll_fn f, void *ctx) { return f(ctx); }
*/
import "C"

import (
	"sync"
	"sync/atomic"
	"unsafe"
)

// Tasks: the caller's futures polled on goroutines (tsffi.h). A session's
// admission reads and writes the netstack, the database's socket (through
// this runtime's netpoller, see fdwait.go) and the caller's engines; polled
// here, each message it waits for readies a goroutine, as it does for
// tsnet's own connections, instead of waking a thread of another runtime.
// Nothing here looks at what the task does.

// A task has a goroutine only while it is being polled: an idle session
// (one waiting for its relay to end) holds none. A wake of an idle task
// hands it to a kept goroutine (goRun, pool.go); a wake while it is polled
// has it polled once more.
const (
	taskIdle     int32 = iota
	taskPolling        // a goroutine polls it
	taskNotified       // a goroutine polls it, and it was woken meanwhile
)

type task struct {
	id    uint64
	poll  C.tsffi_poll_fn
	ctx   unsafe.Pointer
	state atomic.Int32
}

var tasks sync.Map // id -> *task

//export tsffi_task_start
func tsffi_task_start(id C.ulonglong, poll C.tsffi_poll_fn, ctx unsafe.Pointer) {
	t := &task{id: uint64(id), poll: poll, ctx: ctx}
	t.state.Store(taskPolling)
	tasks.Store(t.id, t)
	goRun(t)
}

// run polls the task until it is over or waits with no wake pending.
func (t *task) run() {
	for {
		if C.call_poll(t.poll, t.ctx) != 0 {
			tasks.Delete(t.id)
			return
		}
		if t.state.CompareAndSwap(taskPolling, taskIdle) {
			return
		}
		// Woken while it was polled: poll again.
		t.state.Store(taskPolling)
	}
}

//export tsffi_task_wake
func tsffi_task_wake(id C.ulonglong) {
	v, ok := tasks.Load(uint64(id))
	if !ok {
		return // the task is over
	}
	t := v.(*task)
	for {
		switch s := t.state.Load(); s {
		case taskIdle:
			if t.state.CompareAndSwap(taskIdle, taskPolling) {
				goRun(t)
				return
			}
		case taskPolling:
			if t.state.CompareAndSwap(taskPolling, taskNotified) {
				return
			}
		default: // a wake is pending already
			return
		}
	}
}
