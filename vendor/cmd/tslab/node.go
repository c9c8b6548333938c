package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/net/netns"
	"tailscale.com/net/tsaddr"
	"tailscale.com/tsnet"
	"tailscale.com/types/logger"
)

// forwardSpec is one --forward LISTEN=TARGET.
type forwardSpec struct {
	Listen string `json:"listen"` // loopback ip:port; the bound one once listening
	Target string `json:"target"` // tailnet host:port
}

type forwardFlag []forwardSpec

func (f *forwardFlag) String() string { return fmt.Sprint(*f) }

func (f *forwardFlag) Set(s string) error {
	listen, target, ok := strings.Cut(s, "=")
	if !ok {
		return errors.New("want LISTEN=TARGET, e.g. 127.0.0.1:0=proxy:5432")
	}
	if _, err := parseLoopbackAddrPort(listen); err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return fmt.Errorf("target %q: %w", target, err)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("target %q: bad port", target)
	}
	if host == "" {
		return fmt.Errorf("target %q: empty host", target)
	}
	// Tailnet IPs only: anything else would leave the tailnet.
	if ip, err := netip.ParseAddr(host); err == nil && !tsaddr.IsTailscaleIP(ip) {
		return fmt.Errorf("target %q: %v is not a tailnet IP", target, ip)
	}
	*f = append(*f, forwardSpec{Listen: listen, Target: target})
	return nil
}

// serveSpec is one --serve PORT=TARGET: the reverse of a forward.
type serveSpec struct {
	Port   int    `json:"port"`   // tailnet port this node listens on
	Target string `json:"target"` // loopback ip:port each connection is relayed to
}

type serveFlag []serveSpec

func (f *serveFlag) String() string { return fmt.Sprint(*f) }

func (f *serveFlag) Set(s string) error {
	port, target, ok := strings.Cut(s, "=")
	if !ok {
		return errors.New("want PORT=TARGET, e.g. 5432=127.0.0.1:5433")
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return fmt.Errorf("--serve %q: bad tailnet port", s)
	}
	if _, err := parseLoopbackAddrPort(target); err != nil {
		return err
	}
	*f = append(*f, serveSpec{Port: int(p), Target: target})
	return nil
}

// nodeReady is the line "tslab node" prints once it is serving.
type nodeReady struct {
	Hostname string        `json:"hostname"`
	Name     string        `json:"name"`
	IPs      []string      `json:"ips"`
	Forwards []forwardSpec `json:"forwards"`
	Serves   []serveSpec   `json:"serves,omitempty"`
	EchoPort int           `json:"echo_port,omitempty"`
}

// labNode is a running "tslab node".
type labNode struct {
	srv         *tsnet.Server
	logf        logger.Logf
	dialTimeout time.Duration
	dialTries   int
	announceSrc bool
	suffix      string // MagicDNS suffix, without dots at the ends
}

func runNode(args []string) error {
	fs := flag.NewFlagSet("tslab node", flag.ContinueOnError)
	controlURL := fs.String("control-url", "", "control server URL (loopback only); required")
	hostname := fs.String("hostname", "", "node hostname; required")
	stateDir := fs.String("state-dir", "", "tsnet state directory; required")
	authKey := fs.String("auth-key", "", "auth key to register with")
	tagList := fs.String("advertise-tags", "", "comma-separated tags to request, e.g. tag:ci,tag:db")
	var forwards forwardFlag
	fs.Var(&forwards, "forward", "LISTEN=TARGET: forward loopback LISTEN (port 0 = any) to tailnet TARGET (host:port); repeatable")
	var serves serveFlag
	fs.Var(&serves, "serve", "PORT=TARGET: accept on tailnet PORT and relay each connection, bytes only, to loopback TARGET (ip:port); repeatable")
	announceSrc := fs.Bool("announce-src", false, `first send "TSLAB-SRC <tailnet local ip:port>\n" on each forwarded connection`)
	dialTimeout := fs.Duration("dial-timeout", 5*time.Second, "timeout for each tailnet dial")
	dialTries := fs.Int("dial-attempts", 1, "tailnet dials per forwarded connection when one times out (each a new source port)")
	startTimeout := fs.Duration("timeout", 60*time.Second, "how long to wait for the node to come up")
	direct := fs.Bool("direct", false, "allow direct UDP paths to peers (default: everything goes through the lab DERP)")
	echoPort := fs.Int("echo", 0, "testing aid: echo TCP on this tailnet port (not shown in -h)")
	readyFile := fs.String("ready-file", "", "also write the ready JSON line to this file (atomically)")
	verbose := fs.Bool("v", false, "log to stderr")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: tslab node --control-url URL --hostname NAME --state-dir DIR [flags]\n\n"+
			"Runs a tsnet node forwarding loopback TCP ports into the tailnet.\n\n")
		fs.VisitAll(func(f *flag.Flag) {
			if f.Name == "echo" {
				return // smoke-test aid; documented in the package comment
			}
			typ, usage := flag.UnquoteUsage(f)
			if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "[]" {
				usage += fmt.Sprintf(" (default %s)", f.DefValue)
			}
			fmt.Fprintf(fs.Output(), "  -%s\n    \t%s\n", strings.TrimSpace(f.Name+" "+typ), usage)
		})
	}
	if err := fs.Parse(args); err != nil {
		return parseError(err)
	}
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	case *controlURL == "" || *hostname == "" || *stateDir == "":
		return errors.New("--control-url, --hostname and --state-dir are required")
	case *echoPort < 0 || *echoPort > 65535:
		return fmt.Errorf("--echo %d: bad port", *echoPort)
	}
	if err := checkLoopbackURL(*controlURL); err != nil {
		return fmt.Errorf("--control-url: %w", err)
	}
	var tags []string
	if *tagList != "" {
		for _, t := range strings.Split(*tagList, ",") {
			if !strings.HasPrefix(t, "tag:") || len(t) == len("tag:") {
				return fmt.Errorf("--advertise-tags: invalid tag %q", t)
			}
			tags = append(tags, t)
		}
	}
	// DERP only by default: a node restarted with the same state keeps
	// its node key, and a peer that had a direct UDP path to the old
	// process answers the first WireGuard handshake there; it is lost
	// and the retry comes 5s later. Through DERP (which follows the
	// node key) it arrives at once. TS_DEBUG_NEVER_DIRECT_UDP drops disco
	// pings both ways, so no direct path forms even with peers that
	// don't set it, while UDP stays up for STUN; TS_DEBUG_ALWAYS_USE_DERP
	// would also work but makes every netcheck wait 3s for UDP.
	var extraEnv []envVar
	if !*direct {
		extraEnv = append(extraEnv, envVar{"TS_DEBUG_NEVER_DIRECT_UDP", "true"})
	}
	if err := ensureLabEnv(extraEnv...); err != nil {
		return err
	}
	if err := os.MkdirAll(*stateDir, 0o700); err != nil {
		return err
	}
	logf := setupLogging(*verbose, "tslab node "+*hostname+": ")
	netns.SetEnabled(false)

	srv := &tsnet.Server{
		Dir:           *stateDir,
		ControlURL:    *controlURL,
		Hostname:      *hostname,
		AuthKey:       *authKey,
		AdvertiseTags: tags,
		Ephemeral:     false,
		Logf:          logf,
		UserLogf:      logf,
	}
	defer srv.Close()

	ctx, cancel := signalContext()
	defer cancel()
	upCtx, upCancel := context.WithTimeout(ctx, *startTimeout)
	defer upCancel()
	st, err := srv.Up(upCtx)
	if err != nil {
		return err
	}
	// Until the home DERP connection is up, the DERP server drops
	// packets for this node, so early dials to or from it can stall.
	if err := waitHomeDERP(upCtx, srv); err != nil {
		return fmt.Errorf("waiting for home DERP: %w", err)
	}

	n := &labNode{
		srv:         srv,
		logf:        logf,
		dialTimeout: *dialTimeout,
		dialTries:   max(1, *dialTries),
		announceSrc: *announceSrc,
	}
	if st.CurrentTailnet != nil {
		n.suffix = strings.Trim(st.CurrentTailnet.MagicDNSSuffix, ".")
	}
	for _, f := range forwards {
		if err := n.checkTargetSyntax(f.Target); err != nil {
			return err
		}
	}

	var listeners []net.Listener
	defer func() {
		for _, ln := range listeners {
			ln.Close()
		}
	}()
	ready := nodeReady{
		Hostname: *hostname,
		Name:     strings.TrimSuffix(st.Self.DNSName, "."),
		IPs:      []string{},
		Forwards: []forwardSpec{},
	}
	for _, ip := range st.TailscaleIPs {
		ready.IPs = append(ready.IPs, ip.String())
	}
	for _, f := range forwards {
		ln, err := listenLoopbackTCP(f.Listen)
		if err != nil {
			return fmt.Errorf("--forward %s=%s: %w", f.Listen, f.Target, err)
		}
		listeners = append(listeners, ln)
		f.Listen = ln.Addr().String()
		ready.Forwards = append(ready.Forwards, f)
		go n.serveForward(ctx, ln, f.Target)
	}
	for _, sv := range serves {
		ln, err := srv.Listen("tcp", fmt.Sprintf(":%d", sv.Port))
		if err != nil {
			return fmt.Errorf("--serve %d=%s: %w", sv.Port, sv.Target, err)
		}
		listeners = append(listeners, ln)
		ready.Serves = append(ready.Serves, sv)
		go n.serveReverse(ctx, ln, sv.Target)
	}
	if *echoPort != 0 {
		ln, err := srv.Listen("tcp", fmt.Sprintf(":%d", *echoPort))
		if err != nil {
			return fmt.Errorf("--echo: %w", err)
		}
		listeners = append(listeners, ln)
		ready.EchoPort = *echoPort
		go n.serveEcho(ln)
	}
	if err := announceReady(ready, *readyFile); err != nil {
		return err
	}

	<-ctx.Done()
	logf("shutting down")
	return nil
}

// waitHomeDERP waits until the node has chosen a home DERP region and
// heard from it, the same readiness check tsnet's tests use.
func waitHomeDERP(ctx context.Context, srv *tsnet.Server) error {
	h := srv.Sys().HealthTracker.Get()
	ms := srv.Sys().MagicSock.Get()
	for {
		if r := ms.GetLastNetcheckReport(ctx); r != nil && r.PreferredDERP != 0 &&
			!h.GetDERPRegionReceivedTime(r.PreferredDERP).IsZero() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkTargetSyntax refuses target names that could only be resolved
// outside the tailnet: a name must be a short MagicDNS name or end in
// the tailnet's MagicDNS suffix.
func (n *labNode) checkTargetSyntax(target string) error {
	host, _, _ := net.SplitHostPort(target)
	if _, err := netip.ParseAddr(host); err == nil {
		return nil // tailnet IP, checked by forwardFlag.Set
	}
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	if !strings.Contains(name, ".") || (n.suffix != "" && strings.HasSuffix(name, "."+n.suffix)) {
		return nil
	}
	return fmt.Errorf("--forward target %q: not a MagicDNS name of this tailnet (%s)", target, n.suffix)
}

// checkTargetKnown reports an error if target's host is a name that no
// node (or Tailscale Service) in the current netmap has. tsnet falls back
// to the system resolver for names MagicDNS doesn't know, which must
// never happen in the lab (and would be slow and confusing if it did).
func (n *labNode) checkTargetKnown(ctx context.Context, target string) error {
	host, _, _ := net.SplitHostPort(target)
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	lc, err := n.srv.LocalClient()
	if err != nil {
		return err
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return err
	}
	want := strings.ToLower(strings.TrimSuffix(host, "."))
	nodes := []*ipnstate.PeerStatus{st.Self}
	for _, k := range st.Peers() {
		nodes = append(nodes, st.Peer[k])
	}
	for _, p := range nodes {
		if p == nil {
			continue
		}
		fqdn := strings.ToLower(strings.TrimSuffix(p.DNSName, "."))
		short, _, _ := strings.Cut(fqdn, ".")
		if want == fqdn || want == short {
			return nil
		}
	}
	// Not a node: maybe a Tailscale Service, whose name control sends as
	// DNS records (services.go), which tsnet's dialer resolves from the
	// netmap too.
	if n.suffix != "" && serviceResolves(ctx, lc, want, n.suffix) {
		return nil
	}
	return fmt.Errorf("%q is not in this node's netmap", host)
}

// serviceResolves reports whether the node's MagicDNS resolver has an A
// record for name. Only names under the tailnet's suffix are asked (a
// short name as NAME.suffix, which the lab always sends alongside): the
// resolver answers those itself, and would pass anything else on to
// other resolvers.
func serviceResolves(ctx context.Context, lc *local.Client, name, suffix string) bool {
	if !strings.Contains(name, ".") {
		name += "." + suffix
	}
	if !strings.HasSuffix(name, "."+suffix) {
		return false
	}
	b, _, err := lc.QueryDNS(ctx, name+".", "A")
	// A DNS header is 12 bytes: RCODE is the low 4 bits of byte 3 and
	// the answer count bytes 6-7. The resolver answers a name it holds
	// with A records only.
	return err == nil && len(b) >= 12 && b[3]&0x0f == 0 && binary.BigEndian.Uint16(b[6:8]) > 0
}

func (n *labNode) serveForward(ctx context.Context, ln net.Listener, target string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go n.forward(ctx, c, target)
	}
}

// forward relays one accepted loopback connection to target over the
// tailnet. Failures close the local connection; they are always logged
// because they are usually what a failing test needs to know.
func (n *labNode) forward(ctx context.Context, local net.Conn, target string) {
	dctx, cancel := context.WithTimeout(ctx, n.dialTimeout)
	defer cancel()
	if err := n.checkTargetKnown(dctx, target); err != nil {
		warnf("forward %v -> %s: %v", local.RemoteAddr(), target, err)
		local.Close()
		return
	}
	remote, err := n.dial(ctx, dctx, local.RemoteAddr(), target)
	if err != nil {
		local.Close()
		return
	}
	n.logf("forward %v -> %s via %v", local.RemoteAddr(), target, remote.LocalAddr())
	if n.announceSrc {
		if _, err := fmt.Fprintf(remote, "TSLAB-SRC %s\n", remote.LocalAddr()); err != nil {
			warnf("forward %v -> %s: announce: %v", local.RemoteAddr(), target, err)
			local.Close()
			remote.Close()
			return
		}
	}
	relay(local, remote)
}

// dial dials target, the first time within dctx, and again (up to
// dialTries in all, each with its own dialTimeout) after a dial that timed
// out. A dial can stall when gVisor picks a source port whose 4-tuple the
// peer still holds in TIME_WAIT: every SYN retransmission reuses the port
// and meets the same state, while a new dial picks another port. Nothing
// has been relayed yet, so dialling again is safe. Each failure is logged.
func (n *labNode) dial(ctx, dctx context.Context, from net.Addr, target string) (net.Conn, error) {
	for try := 1; ; try++ {
		remote, err := n.srv.Dial(dctx, "tcp", target)
		if err == nil {
			return remote, nil
		}
		warnf("forward %v -> %s: dial: %v", from, target, err)
		if try >= n.dialTries || !errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			return nil, err
		}
		var cancel context.CancelFunc
		dctx, cancel = context.WithTimeout(ctx, n.dialTimeout)
		defer cancel()
	}
}

// serveReverse relays each tailnet connection on ln to the loopback
// target: a plain TCP forward with no protocol awareness (the benchmark's
// "tailnet floor": what crossing the tailnet costs by itself).
func (n *labNode) serveReverse(ctx context.Context, ln net.Listener, target string) {
	d := net.Dialer{Timeout: n.dialTimeout}
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			local, err := d.DialContext(ctx, "tcp", target)
			if err != nil {
				warnf("serve %v -> %s: dial: %v", c.RemoteAddr(), target, err)
				c.Close()
				return
			}
			n.logf("serve %v -> %s", c.RemoteAddr(), target)
			relay(c, local)
		}()
	}
}

func (n *labNode) serveEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			n.logf("echo: connection from %v", c.RemoteAddr())
			if _, err := io.Copy(c, c); err == nil {
				closeWrite(c)
			}
		}()
	}
}

// relay copies between a and b in both directions until both are done,
// passing each direction's EOF on as a half-close so protocols that
// shut down one direction first keep working.
func relay(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(a, b) }()
	go func() { defer wg.Done(); pipe(b, a) }()
	wg.Wait()
	a.Close()
	b.Close()
}

func pipe(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil {
		// A reset or write failure: tear down both directions so the
		// other copy doesn't block forever.
		dst.Close()
		src.Close()
		return
	}
	closeWrite(dst)
}

// closeWrite half-closes c if it supports that (*net.TCPConn and
// netstack's gonet.TCPConn do) and fully closes it otherwise.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}

// warnf logs to stderr even without -v.
func warnf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tslab node: "+format+"\n", args...)
}
