package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"tailscale.com/tsnet"
)

// listenService makes this node a host of the Tailscale Service name
// ("svc:db") on TCP port: tsnet advertises the Service and forwards each
// of its connections to a loopback listener, behind a PROXY protocol v2
// header naming the client's tailnet address. The listening socket itself
// is handed to the caller (a duplicate, blocking mode untouched): the
// caller accepts on it, checks that each connection comes from this
// process and reads the header. Nothing in Go accepts, so nothing here
// decides trust.
//
// The loopback port is reachable by every local process; that is why the
// caller, not this function, decides what a connection is.
func (n *node) listenService(name string, port uint16) (int, error) {
	if _, err := n.client(); err != nil {
		return -1, err
	}
	n.mu.Lock()
	_, dup := n.services[name]
	n.mu.Unlock()
	if dup {
		return -1, fmt.Errorf("already serving %s", name)
	}
	sl, err := n.srv.ListenService(name, tsnet.ServiceModeTCP{Port: port, PROXYProtocolVersion: 2})
	if err != nil {
		if errors.Is(err, tsnet.ErrUntaggedServiceHost) {
			return -1, fmt.Errorf("serving %s: this node has no tag; a Service host must be tagged "+
				"(an auth key with tags, or --advertise-tags): %w", name, err)
		}
		return -1, fmt.Errorf("serving %s: %w", name, err)
	}
	tl, ok := sl.Listener.(*net.TCPListener)
	if !ok {
		sl.Close()
		return -1, fmt.Errorf("serving %s: tsnet's Service listener is a %T, not a TCP listener", name, sl.Listener)
	}
	raw, err := tl.SyscallConn()
	if err != nil {
		sl.Close()
		return -1, fmt.Errorf("serving %s: %w", name, err)
	}
	fd := -1
	var dupErr error
	if err := raw.Control(func(s uintptr) {
		fd, dupErr = syscall.Dup(int(s))
		if dupErr == nil {
			syscall.CloseOnExec(fd)
		}
	}); err != nil || dupErr != nil {
		sl.Close()
		return -1, fmt.Errorf("serving %s: duplicating the listener: %v", name, errors.Join(err, dupErr))
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		sl.Close()
		syscall.Close(fd)
		return -1, errors.New("node is closed")
	}
	if n.services == nil {
		n.services = map[string]*tsnet.ServiceListener{}
	}
	n.services[name] = sl
	n.mu.Unlock()
	return fd, nil
}

// withdrawService stops advertising the Service and removes its handler:
// the control server routes new connections to the other hosts, and one
// that still reaches this node is refused at once (the caller closes its
// duplicate of the listening socket; with tsnet's closed too, connections
// queued on it are reset).
func (n *node) withdrawService(name string) error {
	n.mu.Lock()
	sl, ok := n.services[name]
	delete(n.services, name)
	n.mu.Unlock()
	if !ok {
		return fmt.Errorf("not serving %s", name)
	}
	return sl.Close()
}

// dialTimeout bounds a dial to a peer (a cancel forwarded to a fleet
// member): a peer that is gone must not hold a cancel for long.
const dialTimeout = 10 * time.Second

// dial connects to addr ("100.64.0.7:5432") over the tailnet and adopts the
// connection, as listen adopts accepted ones.
func (n *node) dial(addr string) (uint64, error) {
	if _, err := n.client(); err != nil {
		return 0, err
	}
	if _, err := gonetLayout(); err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(n.ctx, dialTimeout)
	defer cancel()
	c, err := n.srv.Dial(ctx, "tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("dialing %s over the tailnet: %w", addr, err)
	}
	id, _, err := register(n, nil, c)
	if err != nil {
		c.Close()
		return 0, err
	}
	return id, nil
}
