package main

// What the shim reads of tsnet's and gVisor's internals, checked at the
// pinned versions (vendor/go.mod), so that an upgrade of the pin that moves
// them fails here, in `go test`, and not in production:
//
//   - conn.go reads the unexported ep and wq fields of gonet.TCPConn by
//     name (reflect) and then through unsafe pointers;
//   - whois.go captures each node's LocalBackend through an ipn extension
//     registration, and relies on the backend being handed to extensions
//     as *ipnlocal.LocalBackend, keyed by tsnet.Server.Sys();
//   - node.go passes TS_* knobs with os.Setenv after the process started,
//     which works only for knobs tailscale.com reads lazily.
//
// The tsnet test needs a network namespace holding only loopback (as
// .ci/run provides) and is skipped elsewhere.

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/link/loopback"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"tailscale.com/envknob"
	"tailscale.com/ipn/ipnext"
	"tailscale.com/ipn/ipnlocal"
)

// Compile-time: the backend tsnet hands to extensions can be the type
// whois.go asserts it to.
var _ ipnext.SafeBackend = (*ipnlocal.LocalBackend)(nil)

// TestGonetTCPConnLayout: gonet.TCPConn still has ep (a tcpip.Endpoint)
// and wq (a *waiter.Queue) as direct fields, which gonetLayout checks and
// endpointOf reads through unsafe pointers.
func TestGonetTCPConnLayout(t *testing.T) {
	idx, err := gonetLayout()
	if err != nil {
		t.Fatal(err)
	}
	typ := reflect.TypeOf(gonet.TCPConn{})
	for i, want := range []struct {
		name string
		typ  reflect.Type
	}{
		{"ep", reflect.TypeOf((*tcpip.Endpoint)(nil)).Elem()},
		{"wq", reflect.TypeOf((*waiter.Queue)(nil))},
	} {
		f, ok := typ.FieldByName(want.name)
		if !ok {
			t.Fatalf("gonet.TCPConn has no field %s", want.name)
		}
		if f.Type != want.typ {
			t.Errorf("gonet.TCPConn.%s is %v, the shim reads it as %v", want.name, f.Type, want.typ)
		}
		if len(f.Index) != 1 || f.Index[0] != idx[i] {
			t.Errorf("gonet.TCPConn.%s: index %v, gonetLayout says %d", want.name, f.Index, idx[i])
		}
		if f.IsExported() {
			t.Errorf("gonet.TCPConn.%s is exported now: read it without unsafe", want.name)
		}
	}
}

// netstack is a gVisor stack with one loopback NIC at 127.0.0.1: the same
// TCP endpoints tsnet hands out, without a tailnet.
func netstack(t *testing.T) (*stack.Stack, tcpip.FullAddress) {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	t.Cleanup(func() { s.Close(); s.Wait() })
	if err := s.CreateNIC(1, loopback.New()); err != nil {
		t.Fatalf("CreateNIC: %v", err)
	}
	ip := tcpip.AddrFrom4([4]byte{127, 0, 0, 1})
	pa := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: ip.WithPrefix()}
	if err := s.AddProtocolAddress(1, pa, stack.AddressProperties{}); err != nil {
		t.Fatalf("AddProtocolAddress: %v", err)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: pa.AddressWithPrefix.Subnet(), NIC: 1}})
	return s, tcpip.FullAddress{NIC: 1, Addr: ip, Port: 5432}
}

// connPair returns the accepted (server) side, as *gonet.TCPConn the way
// tsnet's listener returns it, and the dialling side.
func connPair(t *testing.T) (*gonet.TCPConn, *gonet.TCPConn) {
	t.Helper()
	s, addr := netstack(t)
	ln, err := gonet.ListenTCP(s, addr, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	type result struct {
		c   *gonet.TCPConn
		err error
	}
	dialled := make(chan result, 1)
	go func() {
		c, err := gonet.DialTCP(s, addr, ipv4.ProtocolNumber)
		dialled <- result{c, err}
	}()
	accepted, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	d := <-dialled
	if d.err != nil {
		t.Fatal(d.err)
	}
	t.Cleanup(func() { accepted.Close(); d.c.Close() })
	return accepted.(*gonet.TCPConn), d.c
}

// TestEndpointOfReadsTheLiveEndpoint: the endpoint and wait queue
// endpointOf digs out of a real gonet.TCPConn are the connection's own:
// bytes the peer sends are read from ep, the queue signals them, and the
// shim's read reports the connection drained afterwards.
func TestEndpointOfReadsTheLiveEndpoint(t *testing.T) {
	server, client := connPair(t)
	ep, wq, err := endpointOf(server)
	if err != nil {
		t.Fatal(err)
	}
	if ep == nil || wq == nil {
		t.Fatal("endpointOf returned a nil endpoint or queue")
	}
	tc := &tconn{ep: ep, wq: wq}

	// Nothing there yet: -EAGAIN.
	buf := make([]byte, 64)
	drained := false
	if n := tc.read(buf, &drained); n != -int64(syscall.EAGAIN) {
		t.Fatalf("read on an empty connection: %d; want -EAGAIN", n)
	}

	// The wait queue is the one the endpoint notifies.
	readable := make(chan struct{}, 1)
	entry := waiter.NewFunctionEntry(waiter.ReadableEvents, func(waiter.EventMask) {
		select {
		case readable <- struct{}{}:
		default:
		}
	})
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)

	if _, err := client.Write([]byte("hello, tailnet")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-readable:
	case <-time.After(10 * time.Second):
		t.Fatal("the wait queue endpointOf returned was never notified of readable data")
	}
	drained = false
	n := tc.read(buf, &drained)
	if n <= 0 || string(buf[:n]) != "hello, tailnet" {
		t.Fatalf("read %d: %q", n, buf[:max(n, 0)])
	}
	if !drained {
		t.Error("a short read that took everything did not report drained")
	}

	// End of stream is 0, not an error.
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		drained = false
		n = tc.read(buf, &drained)
		if n != -int64(syscall.EAGAIN) || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n != 0 {
		t.Fatalf("read after the peer's FIN: %d, want 0", n)
	}
}

// iovecs builds C iovecs (the type of like's elements, which test files
// cannot name: cgo is not allowed in them) pointing at bufs, after checking
// that the type is laid out as struct iovec {void *iov_base; size_t
// iov_len}.
func iovecs[T any](t *testing.T, like []T, bufs ...[]byte) []T {
	t.Helper()
	typ := reflect.TypeOf(like).Elem()
	base, ok1 := typ.FieldByName("iov_base")
	length, ok2 := typ.FieldByName("iov_len")
	if !ok1 || !ok2 || base.Offset != 0 || base.Type.Size() != unsafe.Sizeof(uintptr(0)) ||
		length.Type.Size() != unsafe.Sizeof(uintptr(0)) || typ.Size() != 2*unsafe.Sizeof(uintptr(0)) {
		t.Fatalf("C.struct_iovec is not {iov_base, iov_len}: %v", typ)
	}
	out := make([]T, len(bufs))
	for i, b := range bufs {
		p := unsafe.Pointer(&out[i])
		if len(b) > 0 {
			*(*unsafe.Pointer)(p) = unsafe.Pointer(&b[0])
		}
		*(*uintptr)(unsafe.Add(p, length.Offset)) = uintptr(len(b))
	}
	return out
}

// TestGather: the netstack's view of one tsffi_conn_write reads the
// buffers in order, across their boundaries, skipping empty ones.
func TestGather(t *testing.T) {
	var g gather
	bufs := [][]byte{[]byte("Hel"), nil, []byte("lo, "), {}, []byte("world")}
	g.reset(iovecs(t, g.bufs, bufs...))
	if g.Len() != 12 {
		t.Fatalf("Len %d, want 12", g.Len())
	}
	var got []byte
	for _, n := range []int{1, 4, 2, 100} {
		p := make([]byte, n)
		k, err := g.Read(p)
		if err != nil {
			t.Fatalf("Read(%d): %v", n, err)
		}
		got = append(got, p[:k]...)
	}
	if string(got) != "Hello, world" || g.Len() != 0 {
		t.Fatalf("read %q, %d left", got, g.Len())
	}
	if k, err := g.Read(make([]byte, 8)); k != 0 || err != io.EOF {
		t.Fatalf("Read past the end: %d, %v; want 0, EOF", k, err)
	}

	// No buffers at all, and only empty ones.
	g.reset(nil)
	if k, err := g.Read(make([]byte, 8)); g.Len() != 0 || k != 0 || err != io.EOF {
		t.Fatalf("no buffers: Len %d, Read %d, %v", g.Len(), k, err)
	}
	g.reset(iovecs(t, g.bufs, nil, []byte{}))
	if k, err := g.Read(make([]byte, 8)); g.Len() != 0 || k != 0 || err != io.EOF {
		t.Fatalf("empty buffers: Len %d, Read %d, %v", g.Len(), k, err)
	}
}

// TestWriteGathersIntoTheEndpoint: tsffi_conn_write's path (tconn.write
// with a gather as the tcpip.Payloader) delivers the buffers in order.
func TestWriteGathersIntoTheEndpoint(t *testing.T) {
	server, client := connPair(t)
	ep, wq, err := endpointOf(server)
	if err != nil {
		t.Fatal(err)
	}
	tc := &tconn{ep: ep, wq: wq}
	big := bytes.Repeat([]byte("0123456789abcdef"), 1024) // 16 KiB: several segments
	bufs := [][]byte{[]byte("first "), big, []byte(" last")}
	want := bytes.Join(bufs, nil)
	var sent int64
	deadline := time.Now().Add(10 * time.Second)
	for sent < int64(len(want)) {
		rest := want[sent:]
		n := tc.write(iovecs(t, tc.wr.bufs, rest))
		switch {
		case n > 0:
			sent += n
		case n == -int64(syscall.EAGAIN) && time.Now().Before(deadline):
			time.Sleep(5 * time.Millisecond)
		default:
			t.Fatalf("write: %d after %d bytes", n, sent)
		}
	}
	got := make([]byte, len(want))
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the peer read something else than was written")
	}

	// The first write of several buffers goes through in one call.
	n := tc.write(iovecs(t, tc.wr.bufs, bufs...))
	if n <= int64(len(bufs[0])) {
		t.Fatalf("a gathered write took %d bytes: only the first buffer?", n)
	}
	if tc.shutdownWrite() != 0 {
		t.Fatal("shutdownWrite failed")
	}
}

// TestErrno: netstack errors become the errnos tsffi.h promises.
func TestErrno(t *testing.T) {
	for _, c := range []struct {
		err  tcpip.Error
		want syscall.Errno
	}{
		{&tcpip.ErrWouldBlock{}, syscall.EAGAIN},
		{&tcpip.ErrClosedForSend{}, syscall.EPIPE},
		{&tcpip.ErrConnectionReset{}, syscall.ECONNRESET},
		{&tcpip.ErrConnectionAborted{}, syscall.ECONNABORTED},
		{&tcpip.ErrAborted{}, syscall.ECONNABORTED},
		{&tcpip.ErrNotConnected{}, syscall.ENOTCONN},
		{&tcpip.ErrTimeout{}, syscall.ETIMEDOUT},
		{&tcpip.ErrConnectionRefused{}, syscall.ECONNREFUSED},
		{&tcpip.ErrInvalidEndpointState{}, syscall.EIO},
	} {
		if got := errno(c.err); got != c.want {
			t.Errorf("errno(%T) = %v, want %v", c.err, got, c.want)
		}
	}
}

// TestUnknownConnection: every tsffi_conn_* call on an id that is not (or
// no longer) registered gives -ECONNABORTED.
func TestUnknownConnection(t *testing.T) {
	called := false
	got := onConn(1<<63, func(*tconn) int64 { called = true; return 0 })
	if got != -int64(syscall.ECONNABORTED) || called {
		t.Fatalf("onConn on an unknown id: %d (op called: %v)", got, called)
	}
}

// TestNoLogsKnobIsReadLazily: tsffi_new's "env" sets knobs with
// os.Setenv after the process started. tailgres's one production use,
// TS_NO_LOGS_NO_SUPPORT (log upload off unless --tailscale-log-upload),
// works only while tailscale.com reads that knob at use, not at init.
func TestNoLogsKnobIsReadLazily(t *testing.T) {
	const k = "TS_NO_LOGS_NO_SUPPORT"
	old, had := os.LookupEnv(k)
	t.Cleanup(func() {
		if had {
			os.Setenv(k, old)
		} else {
			os.Unsetenv(k)
		}
	})
	os.Unsetenv(k)
	if envknob.NoLogsNoSupport() {
		t.Fatalf("%s unset, yet NoLogsNoSupport", k)
	}
	os.Setenv(k, "true")
	if !envknob.NoLogsNoSupport() {
		t.Fatalf("%s=true set with os.Setenv is not seen: tailscale.com now reads it at init, "+
			"so tsffi_new's env cannot turn log upload off", k)
	}
}

// TestNodeConfig: tsffi_new's JSON is strict, and a node that was never
// started can be asked for nothing but closes cleanly (tsffi.h: close is
// safe in every state).
func TestNodeConfig(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ json, want string }{
		{`{"dir": "` + dir + `", "hostname": "pg", "auth_kee": "x"}`, "invalid node configuration"},
		{`{"hostname": "pg"}`, "state directory is required"},
		{`{"dir": "` + dir + `"}`, "hostname is required"},
		{`{"dir": "` + dir + `", "hostname": "pg", "env": {"PATH": "/x"}}`, "not a TS_* variable"},
		{`{"dir": "/proc/tsffi-test", "hostname": "pg"}`, "cannot be created"},
		{`not json`, "invalid node configuration"},
	} {
		if _, err := newNode(c.json); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("newNode(%s): %v, want an error with %q", c.json, err, c.want)
		}
	}

	n, err := newNode(`{"dir": "` + dir + `/state", "hostname": "pg"}`)
	if err != nil {
		t.Fatal(err)
	}
	for name, call := range map[string]func() error{
		"status": func() error { _, err := n.status(); return err },
		"whois":  func() error { _, err := n.whois(netip.MustParseAddrPort("100.64.0.1:1")); return err },
		"listen": func() error { _, err := n.listen("tcp", ":5432"); return err },
		"watch":  func() error { _, err := n.watch(); return err },
	} {
		if err := call(); err == nil || !strings.Contains(err.Error(), "not started") {
			t.Errorf("%s before start: %v, want \"not started\"", name, err)
		}
	}
	n.close()
	n.close() // idempotent
	if err := n.start(); err == nil {
		t.Error("start after close succeeded")
	}
}

// loopbackOnly reports whether this process's network namespace holds
// nothing but lo, so a tsnet node started here cannot reach any network.
func loopbackOnly() bool {
	dev, err := os.ReadFile("/proc/self/net/dev")
	if err != nil {
		return false
	}
	lines := strings.Split(strings.TrimSpace(string(dev)), "\n")
	if len(lines) < 3 {
		return false
	}
	for _, l := range lines[2:] {
		if name, _, _ := strings.Cut(l, ":"); strings.TrimSpace(name) != "lo" {
			return false
		}
	}
	return true
}

// TestStartedNodeRegistersItsBackend: a tsnet node started through the
// shim (with a control server that does not answer) has its LocalBackend
// captured for in-process WhoIs; WhoIs of an unknown address fails as
// "no tailnet node", not as "not registered"; the descriptors handed out
// see end of stream when the node closes; and the registration is dropped.
func TestStartedNodeRegistersItsBackend(t *testing.T) {
	if !loopbackOnly() {
		t.Skip("starts a tsnet node: run in a network namespace holding only lo " +
			"(unshare --net, as .ci/run does)")
	}
	n, err := newNode(`{"dir": "` + t.TempDir() + `", "hostname": "tsffi-test",
		"control_url": "http://127.0.0.1:9", "env": {"TS_NO_LOGS_NO_SUPPORT": "true"}}`)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	if err := n.start(); err != nil {
		t.Fatal(err)
	}
	if _, err := n.backend(); err != nil {
		t.Fatalf("the LocalBackend was not captured: %v", err)
	}
	sys := n.srv.Sys()
	_, err = n.whois(netip.MustParseAddrPort("100.64.0.1:5432"))
	if !errors.Is(err, errNoNode) {
		t.Fatalf("whois of an unknown peer: %v", err)
	}
	js, err := n.status()
	if err != nil {
		t.Fatal(err)
	}
	var st statusJSON
	if err := json.Unmarshal(js, &st); err != nil || st.BackendState == "" || st.TailscaleIPs == nil {
		t.Fatalf("status %s: %v", js, err)
	}

	lfd, err := n.listen("tcp", ":5432")
	if err != nil {
		t.Fatal(err)
	}
	wfd, err := n.watch()
	if err != nil {
		t.Fatal(err)
	}
	n.close()
	for name, fd := range map[string]int{"listener": lfd, "watch": wfd} {
		if err := eofWithin(fd, 10*time.Second); err != nil {
			t.Errorf("%s fd after close: %v", name, err)
		}
		syscall.Close(fd)
	}
	if _, ok := backends.Load(sys); ok {
		t.Error("the closed node's backend is still registered")
	}
}

// eofWithin reads fd until end of stream (data is discarded), for at most d.
func eofWithin(fd int, d time.Duration) error {
	tv := syscall.NsecToTimeval(d.Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	for {
		n, err := syscall.Read(fd, buf)
		switch {
		case errors.Is(err, syscall.EINTR):
		case err != nil:
			return err
		case n == 0:
			return nil
		}
	}
}

// TestAddressesAreValues: the announcement's layout (TSFFI_ANNOUNCE_LEN
// bytes: id little-endian, 16-byte IP with IPv4 mapped, port big-endian),
// and the address the C side passes back to whois, for both families.
func TestAddressesAreValues(t *testing.T) {
	for _, s := range []string{"100.64.0.7:54321", "[fd7a:115c:a1e0::7]:5432", "0.0.0.0:0"} {
		ap := netip.MustParseAddrPort(s)
		msg := announcement(0x0102030405060708, ap)
		if len(msg) != 26 {
			t.Fatalf("%s: %d bytes, want TSFFI_ANNOUNCE_LEN (26)", s, len(msg))
		}
		if msg[0] != 8 || msg[7] != 1 {
			t.Fatalf("%s: id not little-endian: % x", s, msg[:8])
		}
		var ip [16]byte
		copy(ip[:], msg[8:24])
		port := uint16(msg[24])<<8 | uint16(msg[25])
		if got := addrPortOf(ip, port); got != ap {
			t.Fatalf("%s: round trip gave %s", s, got)
		}
	}
	if got := addrPortOf(netip.MustParseAddr("::ffff:100.64.0.7").As16(), 1); !got.Addr().Is4() {
		t.Fatalf("an IPv4-mapped address stays IPv6: %s", got)
	}
}

// TestListenerCloseLeavesRelayedConnections: a listener that stops closes
// the connections it announced that nobody took, never one handed to a
// relay (a drain stops listening while sessions go on); the node's close
// ends those too.
func TestListenerCloseLeavesRelayedConnections(t *testing.T) {
	server, _ := connPair(t)
	ep, wq, err := endpointOf(server)
	if err != nil {
		t.Fatal(err)
	}
	ln := &tailnetListener{}
	relayed := &tconn{ep: ep, wq: wq, ln: ln}
	if err := relayed.detach(); err != nil {
		t.Fatal(err)
	}
	untaken := &tconn{ep: ep, wq: wq, ln: ln}
	conns.Store(uint64(1<<62), relayed)
	conns.Store(uint64(1<<62+1), untaken)
	defer conns.Delete(uint64(1 << 62))
	defer conns.Delete(uint64(1<<62 + 1))

	closeConns(func(tc *tconn) bool { return tc.ln == ln }, true)
	if relayed.closed {
		t.Fatal("the listener's close closed a relayed connection")
	}
	if !untaken.closed {
		t.Fatal("the listener's close left a connection nobody took")
	}
	closeConns(func(tc *tconn) bool { return tc.ln == ln }, false)
	if !relayed.closed {
		t.Fatal("the node's close left a relayed connection open")
	}
}

// TestListenersAreDistinct: each listener's connections are told apart by
// the listener's address, so two listeners must never share one.
func TestListenersAreDistinct(t *testing.T) {
	a, b := &tailnetListener{}, &tailnetListener{}
	if a == b {
		t.Fatal("two listeners share an address")
	}
}
