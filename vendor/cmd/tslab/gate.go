package main

import (
	"net"
	"net/http"
	"sync"
)

// gateListener is the control server's listener, which the admin API can
// take down and bring back on the same address (POST /control/down, /up)
// to play a control plane that is unreachable for a while. Everything
// else in the process — DERP, STUN, the admin API, testcontrol's state
// (nodes, keys) — keeps running, as it would when only the coordination
// server is down: peers keep talking through DERP with what they have.
//
// While down, the port is closed (a dial is refused) and every connection
// the control server had is closed, map polls included.
type gateListener struct {
	addr net.Addr

	mu      sync.Mutex
	ln      net.Listener  // nil while down
	changed chan struct{} // closed (and replaced) when ln changes
	closed  bool
	// Every accepted connection still open. The control protocol upgrades
	// its connection (Noise) and the HTTP server forgets hijacked ones, so
	// the gate keeps its own list to cut them all.
	conns map[*gateConn]struct{}
}

// gateConn is an accepted connection that leaves the gate's list on Close.
type gateConn struct {
	net.Conn
	g    *gateListener
	once sync.Once
}

func (c *gateConn) Close() error {
	c.once.Do(func() {
		c.g.mu.Lock()
		delete(c.g.conns, c)
		c.g.mu.Unlock()
	})
	return c.Conn.Close()
}

func newGateListener(ln net.Listener) *gateListener {
	return &gateListener{addr: ln.Addr(), ln: ln, changed: make(chan struct{}), conns: map[*gateConn]struct{}{}}
}

func (g *gateListener) Accept() (net.Conn, error) {
	for {
		g.mu.Lock()
		ln, changed, closed := g.ln, g.changed, g.closed
		g.mu.Unlock()
		if closed {
			return nil, net.ErrClosed
		}
		if ln == nil {
			<-changed
			continue
		}
		c, err := ln.Accept()
		g.mu.Lock()
		current := g.ln == ln
		if err == nil && current {
			gc := &gateConn{Conn: c, g: g}
			g.conns[gc] = struct{}{}
			g.mu.Unlock()
			return gc, nil
		}
		replaced := !current && !g.closed
		g.mu.Unlock()
		if err == nil {
			c.Close() // accepted just as the gate went down
			if replaced {
				continue
			}
			return nil, net.ErrClosed
		}
		if !replaced {
			return nil, err
		}
		// Taken down (or down and up again) under us: wait for the next.
	}
}

func (g *gateListener) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	var err error
	if g.ln != nil {
		err = g.ln.Close()
		g.ln = nil
	}
	close(g.changed)
	return err
}

func (g *gateListener) Addr() net.Addr { return g.addr }

// up reports whether the control server is reachable.
func (g *gateListener) up() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ln != nil
}

// setUp takes the control server down (closing its port and cutting every
// connection it has) or brings it back on the same address. Idempotent.
func (g *gateListener) setUp(up bool) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return net.ErrClosed
	}
	if up == (g.ln != nil) {
		g.mu.Unlock()
		return nil
	}
	if up {
		// Go listeners set SO_REUSEADDR: the port is free again at once.
		ln, err := net.Listen("tcp", g.addr.String())
		if err != nil {
			g.mu.Unlock()
			return err
		}
		g.ln = ln
	} else {
		g.ln.Close()
		g.ln = nil
	}
	close(g.changed)
	g.changed = make(chan struct{})
	var cut []*gateConn
	if !up {
		for c := range g.conns {
			cut = append(cut, c)
		}
	}
	g.mu.Unlock()
	for _, c := range cut {
		c.Close()
	}
	return nil
}

// getControl and setControl: GET /control, POST /control/down, POST /control/up.
func (l *lab) getControl(r *http.Request) (any, error) {
	return map[string]bool{"up": l.gate.up()}, nil
}

func (l *lab) setControl(up bool) func(*http.Request) (any, error) {
	return func(r *http.Request) (any, error) {
		if err := l.gate.setUp(up); err != nil {
			return nil, err
		}
		return map[string]bool{"up": l.gate.up()}, nil
	}
}
