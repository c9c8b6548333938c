package main

/*
#include <stdint.h>
#include "tsffi.h"

// cgo cannot call C function pointers directly. Pointers cross as
// integers: the ops and ctx are C memory, and a buffer is a Go heap
// allocation the caller keeps alive across the call (runtime.KeepAlive)
// that holds no Go pointers and that the engine does not keep; as integers
// they skip cgo's pointer check, which otherwise runs on every call.
#define OPS(o) ((const tsffi_relay_ops *)(o))
static unsigned int relay_begin(uintptr_t o, uintptr_t ctx, int side) {
	return OPS(o)->begin((void *)ctx, side);
}
static unsigned int relay_input(uintptr_t o, uintptr_t ctx, int side, uintptr_t buf, size_t len) {
	return OPS(o)->input((void *)ctx, side, (const unsigned char *)buf, len);
}
static size_t relay_output(uintptr_t o, uintptr_t ctx, int side, uintptr_t buf, size_t cap) {
	return OPS(o)->output((void *)ctx, side, (unsigned char *)buf, cap);
}
static unsigned int relay_failed(uintptr_t o, uintptr_t ctx, int side, int writing, int err) {
	return OPS(o)->failed((void *)ctx, side, writing, err);
}
static void relay_done(uintptr_t o, uintptr_t ctx) { OPS(o)->done((void *)ctx); }
*/
import "C"

import (
	"bytes"
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The data phase of a session, moved by goroutines in this runtime's
// scheduler, as tsnet serves its own connections: the netstack wakes the
// client reader with a channel send (a goroutine switch, not a thread
// wake-up), the database socket is in Go's netpoller, and writes into the
// netstack are made from a goroutine, next to the inject goroutine they
// ready. The engine (C callbacks into tailgres, see tsffi.h) decides
// everything: TLS, message boundaries, who ended the session, the FATAL a
// stopped client is told. Nothing here inspects a byte.

const (
	sideClient   = C.TSFFI_CLIENT
	sideUpstream = C.TSFFI_UPSTREAM
)

// Reads take relayRead bytes; a buffer has room beyond that, so what one
// read becomes once encrypted (TLS adds a header and a tag per record)
// leaves in one write. Buffers are taken only while bytes move, so an idle
// session holds none. They are kept in a free list of their own rather than
// a sync.Pool: a pool is emptied at every GC, and under load each GC cycle
// would allocate (and zero) a new set.
const (
	relayRead = 64 << 10
	relayBuf  = relayRead + 4<<10
)

var relayFree = make(chan *[]byte, 32)

func getBuf() *[]byte {
	select {
	case b := <-relayFree:
		return b
	default:
		b := make([]byte, relayBuf)
		return &b
	}
}

func putBuf(b *[]byte) {
	select {
	case relayFree <- b:
	default: // the list is full: left to the GC
	}
}

type relay struct {
	id  uint64
	tc  *tconn // the client as a netstack endpoint; nil when cl is set
	up  *net.TCPConn
	raw syscall.RawConn
	// cl is the client as a host socket (a Tailscale Service's connection,
	// handed over on loopback), read like the database's.
	cl    *net.TCPConn
	clRaw syscall.RawConn

	ops   C.uintptr_t // C memory: the engine's callbacks and its context
	ctx   C.uintptr_t
	grace time.Duration

	// wmu[side] is held while that side's output is taken and written,
	// so TLS records leave in the order the engine made them.
	wmu  [2]sync.Mutex
	dead [2]atomic.Bool // a write to that side failed
	// clientRd hands a write to the netstack (under wmu[sideClient]); one
	// per relay, so a write allocates nothing.
	clientRd bytes.Reader

	down      sync.Once
	stopped   chan struct{} // closed when the wind-down begins
	graceOver chan struct{} // closed grace after that
	readers   atomic.Int32  // sides still reading

	client      atomic.Int32 // clientIdle, clientReading or clientDone
	clientEntry waiter.Entry
}

var relays sync.Map // conn id -> *relay

//export tsffi_relay_start
func tsffi_relay_start(id C.ulonglong, fd C.int, ops *C.tsffi_relay_ops, ctx unsafe.Pointer, graceMS C.uint) C.int {
	f := os.NewFile(uintptr(fd), "upstream")
	c, err := net.FileConn(f) // a dup; f's descriptor is closed next
	f.Close()
	tc := lookupConn(id)
	if err != nil || tc == nil {
		if c != nil {
			c.Close()
		}
		if tc == nil {
			return -C.int(syscall.ECONNABORTED)
		}
		return -C.int(syscall.EBADF)
	}
	up, ok := c.(*net.TCPConn)
	var raw syscall.RawConn
	if ok {
		raw, err = up.SyscallConn()
	}
	if !ok || err != nil {
		c.Close()
		return -C.int(syscall.ENOTSOCK)
	}
	if err := tc.detach(); err != nil {
		c.Close()
		return -C.int(err.(syscall.Errno))
	}
	r := newRelay(uint64(id), ops, ctx, graceMS)
	r.tc, r.up, r.raw = tc, up, raw
	r.readers.Store(2)
	relays.Store(uint64(id), r)
	r.startClient()
	go r.readUpstream()
	return 0
}

func cptr(p unsafe.Pointer) C.uintptr_t { return C.uintptr_t(uintptr(p)) }

// newRelay is what both starts share: the engine, the grace, the wind-down.
func newRelay(id uint64, ops *C.tsffi_relay_ops, ctx unsafe.Pointer, graceMS C.uint) *relay {
	return &relay{
		id: id, ops: cptr(unsafe.Pointer(ops)), ctx: cptr(ctx),
		grace:   time.Duration(graceMS) * time.Millisecond,
		stopped: make(chan struct{}), graceOver: make(chan struct{}),
	}
}

// tcpOf adopts a socket descriptor (a dup is kept; fd is closed).
func tcpOf(fd C.int) (*net.TCPConn, syscall.RawConn, syscall.Errno) {
	f := os.NewFile(uintptr(fd), "socket")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, nil, syscall.EBADF
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, nil, syscall.ENOTSOCK
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		c.Close()
		return nil, nil, syscall.ENOTSOCK
	}
	return tc, raw, 0
}

//export tsffi_relay_start_sockets
func tsffi_relay_start_sockets(clientFD, upstreamFD C.int, ops *C.tsffi_relay_ops, ctx unsafe.Pointer, graceMS C.uint, outID *C.ulonglong) C.int {
	cl, clRaw, e1 := tcpOf(clientFD)
	up, raw, e2 := tcpOf(upstreamFD)
	if e1 != 0 || e2 != 0 {
		if cl != nil {
			cl.Close()
		}
		if up != nil {
			up.Close()
		}
		if e1 != 0 {
			return -C.int(e1)
		}
		return -C.int(e2)
	}
	id := nextConnID.Add(1)
	r := newRelay(id, ops, ctx, graceMS)
	r.up, r.raw, r.cl, r.clRaw = up, raw, cl, clRaw
	// Not the netstack's idle/reading dance: a reader goroutine per side.
	r.client.Store(clientReading)
	r.readers.Store(2)
	relays.Store(id, r)
	*outID = C.ulonglong(id)
	go r.readSocket(sideClient, r.clRaw)
	go r.readSocket(sideUpstream, r.raw)
	return 0
}

//export tsffi_relay_kick
func tsffi_relay_kick(id C.ulonglong) {
	if v, ok := relays.Load(uint64(id)); ok {
		// On a goroutine: the wind-down may end the relay, whose last
		// writes may wait (up to the grace), and the caller must not.
		go v.(*relay).windDown()
	}
}

// detach hands the connection from C's wake callback to a relay.
func (tc *tconn) detach() error {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.closed {
		return syscall.ECONNABORTED
	}
	if tc.attached {
		// Waits for a callback under way: after this, wake is never called.
		tc.wq.EventUnregister(&tc.entry)
		tc.attached = false
	}
	tc.relayed = true
	return nil
}

// windDown stops both sides' reading; from now on every write has
// r.grace.
func (r *relay) windDown() {
	first := false
	r.down.Do(func() {
		first = true
		close(r.stopped)
		r.up.SetReadDeadline(time.Unix(1, 0))
		r.up.SetWriteDeadline(time.Now().Add(r.grace))
		if r.cl != nil {
			r.cl.SetReadDeadline(time.Unix(1, 0))
			r.cl.SetWriteDeadline(time.Now().Add(r.grace))
		}
		time.AfterFunc(r.grace, func() { close(r.graceOver) })
	})
	// A client side with no reader running ends here (outside Do: this may
	// be the last side, whose end calls windDown again); a running one sees
	// r.stopped.
	if first && r.client.CompareAndSwap(clientIdle, clientDone) {
		r.tc.wq.EventUnregister(&r.clientEntry)
		r.readerDone()
	}
}

func (r *relay) isStopped() bool {
	select {
	case <-r.stopped:
		return true
	default:
		return false
	}
}

// The client side has no goroutine while the client is quiet: a wait
// queue callback (on the netstack goroutine that queued the data, under the
// endpoint's lock, so it must not read) starts one, which reads until the
// netstack has nothing more and ends. An idle session costs one goroutine
// (the database reader), not two.
const (
	clientIdle int32 = iota
	clientReading
	clientDone
)

func (r *relay) startClient() {
	r.clientEntry = waiter.NewFunctionEntry(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr,
		func(waiter.EventMask) {
			if r.client.CompareAndSwap(clientIdle, clientReading) {
				goRun(r)
			}
		})
	r.client.Store(clientReading)
	r.tc.wq.EventRegister(&r.clientEntry)
	go func() {
		if !r.act(sideClient, C.relay_begin(r.ops, r.ctx, sideClient)) {
			r.clientOver()
			return
		}
		worker(r)
	}()
}

// run is a wake's work on the client side (goRun): read until the
// netstack has nothing more.
func (r *relay) run() { r.readClient() }

// readClient reads the tailnet connection straight from the netstack until
// it has nothing more (or the side is done).
func (r *relay) readClient() {
	for {
		if r.isStopped() {
			r.clientOver()
			return
		}
		bp := getBuf()
		w := tcpip.SliceWriter((*bp)[:relayRead])
		res, err := r.tc.ep.Read(&w, tcpip.ReadOptions{})
		var bits C.uint
		switch err.(type) {
		case nil:
			r.tc.ep.ModerateRecvBuf(res.Count)
			bits = r.input(sideClient, (*bp)[:res.Count])
		case *tcpip.ErrWouldBlock:
			putBuf(bp)
			r.client.Store(clientIdle)
			// A notification between the read and the store found this
			// goroutine still reading and started none: look again.
			if r.tc.ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) == 0 && !r.isStopped() {
				return
			}
			if !r.client.CompareAndSwap(clientIdle, clientReading) {
				return // another reader took over, or the side is done
			}
			continue
		case *tcpip.ErrClosedForReceive:
			bits = r.input(sideClient, nil)
		default:
			bits = C.relay_failed(r.ops, r.ctx, sideClient, 0, C.int(errno(err)))
		}
		putBuf(bp)
		if !r.act(sideClient, bits) {
			r.clientOver()
			return
		}
	}
}

// clientOver ends the client side's reading, once.
func (r *relay) clientOver() {
	if r.client.Swap(clientDone) != clientDone {
		r.tc.wq.EventUnregister(&r.clientEntry)
		r.readerDone()
	}
}

// readUpstream reads the database's socket.
func (r *relay) readUpstream() { r.readSocket(sideUpstream, r.raw) }

// readSocket reads side's socket through Go's netpoller; the buffer is
// taken only once the socket is readable.
func (r *relay) readSocket(side C.int, raw syscall.RawConn) {
	defer r.readerDone()
	if !r.act(side, C.relay_begin(r.ops, r.ctx, side)) {
		return
	}
	var (
		bp   *[]byte
		n    int
		rerr error
	)
	// Made once per reader (a closure per read would be an allocation).
	read := func(fd uintptr) bool {
		bp = getBuf()
		for {
			n, rerr = syscall.Read(int(fd), (*bp)[:relayRead])
			if rerr != syscall.EINTR {
				break
			}
		}
		if rerr == syscall.EAGAIN {
			putBuf(bp)
			bp = nil
			return false
		}
		return true
	}
	for {
		bp, n, rerr = nil, 0, nil
		err := raw.Read(read)
		if r.isStopped() {
			if bp != nil {
				putBuf(bp)
			}
			return
		}
		var bits C.uint
		switch {
		case err != nil:
			bits = C.relay_failed(r.ops, r.ctx, side, 0, C.int(errnoOf(err)))
		case rerr != nil:
			bits = C.relay_failed(r.ops, r.ctx, side, 0, C.int(errnoOf(rerr)))
		case n == 0:
			bits = r.input(side, nil)
		default:
			bits = r.input(side, (*bp)[:n])
		}
		if bp != nil {
			putBuf(bp)
		}
		if !r.act(side, bits) {
			return
		}
	}
}

func (r *relay) input(side C.int, b []byte) C.uint {
	if len(b) == 0 {
		return C.relay_input(r.ops, r.ctx, side, 0, 0)
	}
	bits := C.relay_input(r.ops, r.ctx, side, cptr(unsafe.Pointer(&b[0])), C.size_t(len(b)))
	runtime.KeepAlive(b)
	return bits
}

func writeBit(side C.int) C.uint {
	if side == sideClient {
		return C.TSFFI_RELAY_WRITE_CLIENT
	}
	return C.TSFFI_RELAY_WRITE_UPSTREAM
}

// act does what the engine asked after a read of side; false: this
// reader is done.
func (r *relay) act(side C.int, bits C.uint) bool {
	other := 1 - side
	if bits&writeBit(other) != 0 {
		bits |= r.flush(other)
	}
	if bits&writeBit(side) != 0 {
		bits |= r.flush(side)
	}
	switch {
	case bits&C.TSFFI_RELAY_END != 0:
		r.windDown()
		return false
	case bits&C.TSFFI_RELAY_HALF_CLOSE != 0:
		r.closeWrite(other)
		return false
	}
	return true
}

// flush writes side's pending output; it returns the engine's bits if a
// write failed.
func (r *relay) flush(side C.int) C.uint {
	r.wmu[side].Lock()
	defer r.wmu[side].Unlock()
	if r.dead[side].Load() {
		return 0
	}
	bp := getBuf()
	defer putBuf(bp)
	b := *bp
	for {
		n := int(C.relay_output(r.ops, r.ctx, side, cptr(unsafe.Pointer(&b[0])), C.size_t(len(b))))
		runtime.KeepAlive(b)
		if n > 0 {
			if err := r.write(side, b[:n]); err != nil {
				r.dead[side].Store(true)
				return C.relay_failed(r.ops, r.ctx, side, 1, C.int(errnoOf(err)))
			}
		}
		// A short chunk was all there was; whatever the engine makes
		// later is written by the call that made it.
		if n < len(b) {
			return 0
		}
	}
}

func (r *relay) write(side C.int, b []byte) error {
	switch {
	case side == sideUpstream:
		_, err := r.up.Write(b)
		return err
	case r.cl != nil:
		_, err := r.cl.Write(b)
		return err
	}
	return r.writeClient(b)
}

// writeClient writes all of b into the netstack, waiting while its send
// buffer is full (at most the grace once the wind-down began).
func (r *relay) writeClient(b []byte) error {
	var (
		rd    = &r.clientRd
		entry waiter.Entry
		ready chan struct{}
	)
	for len(b) > 0 {
		rd.Reset(b)
		n, err := r.tc.ep.Write(rd, tcpip.WriteOptions{})
		b = b[n:]
		switch err.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			if ready == nil {
				// Registered, then tried again before waiting: a change
				// between the write and the registration is not missed.
				entry, ready = waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
				r.tc.wq.EventRegister(&entry)
				defer r.tc.wq.EventUnregister(&entry)
				continue
			}
			select {
			case <-ready:
			case <-r.graceOver:
				return syscall.ETIMEDOUT
			}
		default:
			return errno(err)
		}
	}
	return nil
}

func (r *relay) closeWrite(side C.int) {
	r.wmu[side].Lock()
	defer r.wmu[side].Unlock()
	if r.dead[side].Load() {
		return
	}
	switch {
	case side == sideUpstream:
		r.up.CloseWrite()
	case r.cl != nil:
		r.cl.CloseWrite()
	default:
		r.tc.ep.Shutdown(tcpip.ShutdownWrite)
	}
}

// readerDone ends the relay after its last side stopped reading: what is pending (the
// FATAL, TLS close_notify) is written within the grace, both connections
// are closed, and the engine is told.
func (r *relay) readerDone() {
	if r.readers.Add(-1) != 0 {
		return
	}
	r.windDown()
	for _, side := range []C.int{sideClient, sideUpstream} {
		r.flush(side)
		r.closeWrite(side)
	}
	if r.cl != nil {
		r.cl.Close()
	} else {
		r.tc.close(r.id, false, false)
	}
	r.up.Close()
	relays.Delete(r.id)
	C.relay_done(r.ops, r.ctx)
}

// errnoOf gives the errno behind a Go I/O error (EIO when there is none).
func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, os.ErrDeadlineExceeded):
		return syscall.ETIMEDOUT
	case errors.Is(err, net.ErrClosed):
		return syscall.ECONNABORTED
	}
	return syscall.EIO
}
