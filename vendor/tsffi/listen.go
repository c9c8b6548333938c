package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
)

// listen opens a tailnet listener and returns the caller's end of a
// SOCK_SEQPACKET socketpair on which accepted connections are announced.
//
// Why one message per connection carrying both the connection and
// "ip:port": upstream libtailscale hands an fd over first and lets C look
// the address up afterwards by fd number, but that number is closed and
// reused on the Go side, so the lookup can return another peer's address.
// Here the address and the connection id arrive atomically in one message.
func (n *node) listen(network, addr string) (int, error) {
	if _, err := n.client(); err != nil {
		return -1, err
	}
	if _, err := gonetLayout(); err != nil {
		return -1, err
	}
	ln, err := n.srv.Listen(network, addr)
	if err != nil {
		return -1, fmt.Errorf("listen on tailnet %s %s: %w", network, addr, err)
	}
	goEnd, cEnd, err := socketpair(syscall.SOCK_SEQPACKET)
	if err != nil {
		ln.Close()
		return -1, err
	}
	ctrl, err := fileConn(goEnd)
	if err != nil {
		ln.Close()
		syscall.Close(cEnd)
		return -1, err
	}
	uc := ctrl.(*net.UnixConn)
	tl := &tailnetListener{}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ln.Close()
			uc.Close()
			// Hand-overs still queued in the closed socket are lost:
			// close what C never attached.
			closeConns(func(tc *tconn) bool { return tc.ln == tl }, true)
		})
	}
	// The C side closing its end (or the node closing) stops the listener.
	go func() {
		buf := make([]byte, 1)
		uc.Read(buf) // returns on EOF: the C side closed its end
		stop()
	}()
	go func() {
		<-n.ctx.Done()
		stop()
	}()
	go func() {
		defer stop()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // listener closed
			}
			if err := handOver(uc, n, tl, c); err != nil {
				c.Close()
				if errors.Is(err, syscall.EPIPE) || errors.Is(err, net.ErrClosed) {
					return
				}
			}
		}
	}()
	return cEnd, nil
}

// tailnetListener identifies one listener's connections by its address.
// Not zero-sized: Go may give every zero-sized allocation the same
// address, which would make all listeners one.
type tailnetListener struct{ _ byte }

// handOver adopts c and sends its id, with c's remote address, to the C
// side in one message (see announcement).
func handOver(ctrl *net.UnixConn, n *node, ln *tailnetListener, c net.Conn) error {
	remote, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		c.Close()
		return fmt.Errorf("a tailnet connection from a %T, not a TCP address", c.RemoteAddr())
	}
	id, tc, err := register(n, ln, c)
	if err != nil {
		return err
	}
	msg := announcement(id, remote.AddrPort())
	if _, _, err := ctrl.WriteMsgUnix(msg, nil, nil); err != nil {
		tc.close(id, false, false)
		return err
	}
	return nil
}

func socketpair(typ int) (goEnd, cEnd int, err error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, typ|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, fmt.Errorf("socketpair: %w", err)
	}
	return fds[0], fds[1], nil
}

// fileConn turns a raw fd into a net.Conn served by Go's netpoller (it
// sets the fd non-blocking), so an idle connection pins no OS thread.
func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "tsffi-socket")
	defer f.Close() // FileConn holds its own duplicate
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("wrapping socket: %w", err)
	}
	return c, nil
}
