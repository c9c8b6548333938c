package main

/*
#include "tsffi.h"

// cgo cannot call a C function pointer directly.
static int call_poll(tsffi_poll_fn f, void *ctx) { return f(ctx); }
*/
import "C"

import (
	"sync"
	"unsafe"
)

// Tasks: the caller's futures polled on goroutines (tsffi.h). A session's
// admission reads and writes the netstack, the database's socket (through
// this runtime's netpoller, see fdwait.go) and the caller's engines; polled
// here, each message it waits for readies a goroutine, as it does for
// tsnet's own connections, instead of waking a thread of another runtime.
// Nothing here looks at what the task does.

type task struct {
	// wake holds one pending wake-up: a wake while the task is being
	// polled makes the loop poll it once more, and any number of wakes
	// before that are one.
	wake chan struct{}
}

var tasks sync.Map // id -> *task

//export tsffi_task_start
func tsffi_task_start(id C.ulonglong, poll C.tsffi_poll_fn, ctx unsafe.Pointer) {
	t := &task{wake: make(chan struct{}, 1)}
	tasks.Store(uint64(id), t)
	go func() {
		defer tasks.Delete(uint64(id))
		for C.call_poll(poll, ctx) == 0 {
			<-t.wake
		}
	}()
}

//export tsffi_task_wake
func tsffi_task_wake(id C.ulonglong) {
	v, ok := tasks.Load(uint64(id))
	if !ok {
		return // the task is over
	}
	select {
	case v.(*task).wake <- struct{}{}:
	default: // a wake-up is pending already
	}
}
