package main

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// The gate closes the port and cuts open (even hijacked) connections when
// down, and serves again on the same address when up.
func TestGateDownAndUp(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("no loopback: %v", err)
	}
	g := newGateListener(ln)
	hijacked := make(chan net.Conn, 1)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hijack" {
			c, _, _ := w.(http.Hijacker).Hijack()
			hijacked <- c
			return
		}
		io.WriteString(w, "ok")
	}))
	srv.Listener.Close()
	srv.Listener = g
	srv.Start()
	defer srv.Close()

	get := func() error {
		c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get(srv.URL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get(); err != nil {
		t.Fatalf("up: %v", err)
	}

	// A long-lived upgraded connection, like a node's Noise session.
	conn, err := net.Dial("tcp", g.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET /hijack HTTP/1.1\r\nHost: x\r\n\r\n")
	<-hijacked

	if err := g.setUp(false); err != nil {
		t.Fatal(err)
	}
	if g.up() {
		t.Fatal("still up")
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("hijacked connection not cut: %v", err)
	}
	if err := get(); err == nil {
		t.Fatal("served while down")
	}

	if err := g.setUp(true); err != nil {
		t.Fatal(err)
	}
	if err := get(); err != nil {
		t.Fatalf("up again on %s: %v", g.Addr(), err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
