package main

/*
#include "tsffi.h"

// cgo cannot call a C function pointer directly.
static void call_fd_wake(tsffi_wake_fn f, void *ctx, unsigned int events) { f(ctx, events); }
*/
import "C"

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Watched sockets: the caller reads and writes a socket of its own without
// blocking and, when it would block, asks this runtime's netpoller to say
// when the socket may be ready (tsffi.h). A session polled on a goroutine
// (task.go) then waits for the database as a goroutine does, instead of on
// another runtime's reactor.

type watched struct {
	conn net.Conn // a duplicate of the caller's descriptor, in the netpoller
	raw  syscall.RawConn

	// mu is held while wake is called, so once unwatch has set closed no
	// call is under way and none follows.
	mu      sync.Mutex
	closed  bool
	waiting [2]bool // a goroutine waits for: readable, writable
	wake    C.tsffi_wake_fn
	ctx     unsafe.Pointer
}

var (
	watchedFDs  sync.Map // id -> *watched
	nextWatchID atomic.Uint64
)

//export tsffi_fd_watch
func tsffi_fd_watch(fd C.int, wake C.tsffi_wake_fn, ctx unsafe.Pointer, outID *C.ulonglong) C.int {
	// Close-on-exec from the start (no window in which a fork inherits it).
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -C.int(errnoOf(err))
	}
	f := os.NewFile(uintptr(dup), "watched")
	c, err := net.FileConn(f) // another duplicate; f's is closed next
	f.Close()
	if err != nil {
		return -C.int(errnoOf(err))
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		c.Close()
		return -C.int(syscall.ENOTSOCK)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		c.Close()
		return -C.int(syscall.ENOTSOCK)
	}
	id := nextWatchID.Add(1)
	watchedFDs.Store(id, &watched{conn: c, raw: raw, wake: wake, ctx: ctx})
	*outID = C.ulonglong(id)
	return 0
}

// tsffi_fd_wait starts a wait for events (TSFFI_READABLE and/or
// TSFFI_WRITABLE) unless one for them is under way.
//
//export tsffi_fd_wait
func tsffi_fd_wait(id C.ulonglong, events C.uint) C.int {
	v, ok := watchedFDs.Load(uint64(id))
	if !ok {
		return -C.int(syscall.EBADF)
	}
	w := v.(*watched)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return -C.int(syscall.EBADF)
	}
	for dir, ev := range [2]C.uint{C.TSFFI_READABLE, C.TSFFI_WRITABLE} {
		if events&ev != 0 && !w.waiting[dir] {
			w.waiting[dir] = true
			go w.wait(dir, ev)
		}
	}
	return 0
}

// wait returns when the socket is ready for dir (or failed, or is being
// unwatched) and tells the caller. The readiness is checked with poll(2)
// before the netpoller waits: the netpoller forgets an edge that came
// before the wait began, and the caller's last attempt may be older.
func (w *watched) wait(dir int, ev C.uint) {
	events := int16(unix.POLLIN)
	if dir == 1 {
		events = unix.POLLOUT
	}
	ready := func(fd uintptr) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: events}}
		n, err := unix.Poll(p, 0)
		return err != nil || n > 0
	}
	if dir == 0 {
		w.raw.Read(ready)
	} else {
		w.raw.Write(ready)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.waiting[dir] = false
	if !w.closed {
		C.call_fd_wake(w.wake, w.ctx, ev)
	}
}

// tsffi_fd_unwatch ends the watch: when it returns, wake is never called
// again. The caller's descriptor stays open.
//
//export tsffi_fd_unwatch
func tsffi_fd_unwatch(id C.ulonglong) {
	v, ok := watchedFDs.LoadAndDelete(uint64(id))
	if !ok {
		return
	}
	w := v.(*watched)
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.conn.Close() // ends the waits under way
}
