package main

/*
#include "tsffi.h"

// cgo cannot call a C function pointer directly.
static void call_wake(tsffi_wake_fn f, void *ctx, unsigned int events) { f(ctx, events); }
*/
import "C"

import (
	"fmt"
	"io"
	"net"
	"reflect"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/waiter"
)

// A tailnet connection handed to C by id. C reads and writes the netstack
// endpoint directly, without blocking, and is woken through a callback when
// the endpoint becomes readable or writable: no goroutine, no copy buffer
// and no socket sits between the netstack and the caller. (The previous
// design relayed each connection through a socketpair and two goroutines:
// per connection two more fds, two goroutine stacks and two copy buffers,
// and per message two more syscalls and a goroutine switch each way.)
//
// tsnet hands out *gonet.TCPConn, which keeps its endpoint and wait queue
// unexported. They are read once per connection with reflect; the layout
// is checked when the first listener opens (gonetLayout), so a
// tailscale.com/gVisor upgrade that changes it makes listen fail loudly
// rather than misbehave.
type tconn struct {
	ep    tcpip.Endpoint
	wq    *waiter.Queue
	owner *node
	ln    *tailnetListener // for closing connections C never attached

	// rw and wr are reused by read and write (C never reads, or writes,
	// one connection from two threads at once) so neither allocates.
	rw tcpip.SliceWriter
	wr gather

	// mu is held for the whole of close, so a close from C waits for one
	// the node started (which calls wake one last time) to finish: after
	// tsffi_conn_close returns, ctx is never used again.
	mu       sync.Mutex
	entry    waiter.Entry
	attached bool
	relayed  bool // handed to a relay (relay.go), which closes it
	closed   bool
	wake     C.tsffi_wake_fn
	ctx      unsafe.Pointer
}

var (
	conns      sync.Map // uint64 -> *tconn
	nextConnID atomic.Uint64
)

func lookupConn(id C.ulonglong) *tconn {
	v, ok := conns.Load(uint64(id))
	if !ok {
		return nil
	}
	return v.(*tconn)
}

// gonetLayout checks, once, that gonet.TCPConn still has the fields
// endpointOf reads, and returns their indices (ep, wq).
var gonetLayout = sync.OnceValues(func() ([2]int, error) {
	t := reflect.TypeOf(gonet.TCPConn{})
	ep, ok1 := t.FieldByName("ep")
	wq, ok2 := t.FieldByName("wq")
	if !ok1 || !ok2 || len(ep.Index) != 1 || len(wq.Index) != 1 ||
		ep.Type != reflect.TypeOf((*tcpip.Endpoint)(nil)).Elem() ||
		wq.Type != reflect.TypeOf((*waiter.Queue)(nil)) {
		return [2]int{}, fmt.Errorf("tsffi: gvisor's gonet.TCPConn no longer has the ep and wq fields " +
			"tailgres reads; this tailscale.com version is not supported")
	}
	return [2]int{ep.Index[0], wq.Index[0]}, nil
})

// endpointOf returns the netstack endpoint and wait queue behind a
// connection tsnet accepted.
func endpointOf(c net.Conn) (tcpip.Endpoint, *waiter.Queue, error) {
	idx, err := gonetLayout()
	if err != nil {
		return nil, nil, err
	}
	tc, ok := c.(*gonet.TCPConn)
	if !ok {
		return nil, nil, fmt.Errorf("tsffi: tailnet connection is a %T, not a netstack TCP connection", c)
	}
	v := reflect.ValueOf(tc).Elem()
	// gonetLayout checked both fields' types, so these reads are sound.
	ep := *(*tcpip.Endpoint)(unsafe.Pointer(v.Field(idx[0]).UnsafeAddr()))
	wq := *(**waiter.Queue)(unsafe.Pointer(v.Field(idx[1]).UnsafeAddr()))
	return ep, wq, nil
}

// register adopts an accepted connection and returns it with its id.
func register(n *node, ln *tailnetListener, c net.Conn) (uint64, *tconn, error) {
	ep, wq, err := endpointOf(c)
	if err != nil {
		return 0, nil, err
	}
	id := nextConnID.Add(1)
	tc := &tconn{ep: ep, wq: wq, owner: n, ln: ln}
	conns.Store(id, tc)
	return id, tc, nil
}

func (tc *tconn) attach(wake C.tsffi_wake_fn, ctx unsafe.Pointer) error {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.closed {
		return syscall.ECONNABORTED
	}
	if tc.attached {
		return syscall.EBUSY
	}
	tc.wake, tc.ctx = wake, ctx
	// Runs on the netstack goroutine that changed the endpoint's state,
	// under the wait queue's read lock (which EventUnregister waits for).
	tc.entry = waiter.NewFunctionEntry(waiter.ReadableEvents|waiter.WritableEvents|waiter.EventHUp|waiter.EventErr,
		func(m waiter.EventMask) {
			var ev C.uint
			if m&(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
				ev |= C.TSFFI_READABLE
			}
			if m&(waiter.WritableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
				ev |= C.TSFFI_WRITABLE
			}
			C.call_wake(wake, ctx, ev)
		})
	tc.wq.EventRegister(&tc.entry)
	tc.attached = true
	return nil
}

// read returns the count (> 0), 0 at end of stream, or -errno. *drained
// says the read left nothing to take: no data queued, no end of stream or
// error pending. The endpoint notifies the wait queue after every such
// change (a queued segment, the peer's FIN, a reset), so until the next
// wake the caller may take the connection as empty without calling again.
func (tc *tconn) read(b []byte, drained *bool) int64 {
	tc.rw = b
	res, err := tc.ep.Read(&tc.rw, tcpip.ReadOptions{})
	tc.rw = nil
	if err != nil {
		if _, eof := err.(*tcpip.ErrClosedForReceive); eof {
			return 0
		}
		return -int64(errno(err))
	}
	if res.Count > 0 {
		tc.ep.ModerateRecvBuf(res.Count) // receive-window autotuning, as gonet does
	}
	// Read copies queued segments until b is full or none is left; a full
	// b may have left more behind, so only a short read is checked.
	*drained = res.Count < len(b) &&
		tc.ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) == 0
	return int64(res.Count)
}

// write returns the count written (maybe short) or -errno.
func (tc *tconn) write(bufs []C.struct_iovec) int64 {
	tc.wr.reset(bufs)
	n, err := tc.ep.Write(&tc.wr, tcpip.WriteOptions{})
	tc.wr.reset(nil)
	if n > 0 {
		return n
	}
	if err != nil {
		return -int64(errno(err))
	}
	return 0
}

// gather is the netstack's view (a tcpip.Payloader) of the buffers of one
// tsffi_conn_write: it copies from them, in order, into one send-queue
// entry. The buffers are C's and are read only during the call.
type gather struct {
	bufs []C.struct_iovec // not yet started
	cur  []byte           // the unread rest of the current buffer
	left int              // unread bytes in all of them
}

func (g *gather) reset(bufs []C.struct_iovec) {
	g.bufs, g.cur, g.left = bufs, nil, 0
	for _, b := range bufs {
		g.left += int(b.iov_len)
	}
}

// Len is what is left to read (tcpip.Payloader).
func (g *gather) Len() int { return g.left }

func (g *gather) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		for len(g.cur) == 0 {
			if len(g.bufs) == 0 {
				if n == 0 {
					return 0, io.EOF
				}
				return n, nil
			}
			g.cur = unsafe.Slice((*byte)(g.bufs[0].iov_base), int(g.bufs[0].iov_len))
			g.bufs = g.bufs[1:]
		}
		c := copy(p[n:], g.cur)
		g.cur = g.cur[c:]
		g.left -= c
		n += c
	}
	return n, nil
}

func (tc *tconn) shutdownWrite() int64 {
	if err := tc.ep.Shutdown(tcpip.ShutdownWrite); err != nil {
		return -int64(errno(err))
	}
	return 0
}

// close closes the endpoint (idempotent). byNode says the node or the
// listener is closing it, not C: C is then woken once so that a pending
// read or write sees the connection gone. onlyUnattached leaves alone a
// connection C has attached, or handed to a relay.
func (tc *tconn) close(id uint64, byNode, onlyUnattached bool) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.closed || (onlyUnattached && (tc.attached || tc.relayed)) {
		return
	}
	tc.closed = true
	if tc.attached {
		tc.wq.EventUnregister(&tc.entry)
		if byNode {
			C.call_wake(tc.wake, tc.ctx, C.TSFFI_READABLE|C.TSFFI_WRITABLE)
		}
	}
	tc.ep.Close()
	// Only now: a tsffi_conn_close that finds the id waits on mu for the
	// wake above, and one that does not find it comes after it.
	conns.Delete(id)
}

// closeConns closes the connections that match: the node's, or (with
// onlyUnattached) a listener's that C never attached.
func closeConns(match func(*tconn) bool, onlyUnattached bool) {
	conns.Range(func(k, v any) bool {
		if tc := v.(*tconn); match(tc) {
			tc.close(k.(uint64), true, onlyUnattached)
		}
		return true
	})
}

// errno maps a netstack error to the errno a kernel socket would give.
func errno(err tcpip.Error) syscall.Errno {
	switch err.(type) {
	case *tcpip.ErrWouldBlock:
		return syscall.EAGAIN
	case *tcpip.ErrClosedForSend:
		return syscall.EPIPE
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrNotConnected:
		return syscall.ENOTCONN
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	default:
		return syscall.EIO
	}
}
