package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// listen opens a tailnet listener and returns the caller's end of a
// SOCK_SEQPACKET socketpair on which accepted connections are delivered.
//
// Why one message per connection carrying both the fd and "ip:port":
// upstream libtailscale hands the fd over first and lets C look the address
// up afterwards by fd number, but that number is closed and reused on the
// Go side, so the lookup can return another peer's address. Here the
// address and the fd arrive atomically in the same sendmsg.
func (n *node) listen(network, addr string) (int, error) {
	if _, err := n.client(); err != nil {
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
	var once sync.Once
	stop := func() { once.Do(func() { ln.Close(); uc.Close() }) }
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
			if err := handOver(uc, c); err != nil {
				c.Close()
				if errors.Is(err, syscall.EPIPE) || errors.Is(err, net.ErrClosed) {
					return
				}
			}
		}
	}()
	return cEnd, nil
}

// handOver relays c through a fresh stream socketpair and sends the other
// end, with c's remote address, to the C side in one message.
func handOver(ctrl *net.UnixConn, c net.Conn) error {
	goEnd, cEnd, err := socketpair(syscall.SOCK_STREAM)
	if err != nil {
		return err
	}
	local, err := fileConn(goEnd)
	if err != nil {
		syscall.Close(cEnd)
		return err
	}
	rights := syscall.UnixRights(cEnd)
	_, _, err = ctrl.WriteMsgUnix([]byte(c.RemoteAddr().String()), rights, nil)
	// Our copy of cEnd is no longer needed whether or not it was sent: the
	// receiver holds its own duplicate.
	syscall.Close(cEnd)
	if err != nil {
		local.Close()
		return err
	}
	go splice(c, local)
	return nil
}

// halfCloser is implemented by TCP, netstack (gonet) and Unix connections.
type halfCloser interface{ CloseWrite() error }

// splice copies both ways, forwarding a half-close (EOF one way becomes a
// write shutdown the other way) so that either side's close reaches the
// other, and closes both once both directions are done. Two goroutines per
// connection: one direction runs on the caller's.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		err := copyAdaptive(dst, src)
		if hc, ok := dst.(halfCloser); ok && err == nil {
			hc.CloseWrite()
		} else {
			// An error (reset) in one direction tears down both.
			a.Close()
			b.Close()
		}
	}
	go pipe(a, b)
	pipe(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

// Copy buffers start small, so an idle connection holds little (io.Copy
// would hold 32 KiB each way for its whole life), double while reads fill
// them, and fall back once reads are small again.
const (
	minCopyBuf = 1 << 10
	maxCopyBuf = 64 << 10
)

// copyAdaptive is io.Copy with an adaptive buffer; nil at EOF.
func copyAdaptive(dst io.Writer, src io.Reader) error {
	buf := make([]byte, minCopyBuf)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
			switch {
			case n == len(buf) && len(buf) < maxCopyBuf:
				buf = make([]byte, 2*len(buf))
			case n < len(buf)/8 && len(buf) > minCopyBuf:
				buf = make([]byte, minCopyBuf)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
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
