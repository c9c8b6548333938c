package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netns"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

const magicDNSSuffix = "tail-lab.ts.net"

// controlReady is the line "tslab control" prints once it is serving.
type controlReady struct {
	ControlURL     string `json:"control_url"`
	AdminURL       string `json:"admin_url"`
	DERPAddr       string `json:"derp_addr"`
	STUNAddr       string `json:"stun_addr"`
	MagicDNSSuffix string `json:"magic_dns_suffix"`
}

// lab is one running loopback tailnet: DERP, STUN, control and admin.
type lab struct {
	logf logger.Logf
	ctrl *testcontrol.Server
	mgr  *mapManager
	gate *gateListener // the control server's port (see gate.go)

	derpSrv  *derpserver.Server
	derpHTTP *httptest.Server
	stunPC   *net.UDPConn
	ctrlHTTP *httptest.Server
	stopMgr  context.CancelFunc
	mgrDone  chan struct{}
}

// labConfig is what "tslab control" flags set on the control server.
type labConfig struct {
	authKey      string // if set, nodes must register with it
	requireLogin bool   // new node keys get an interactive login URL
}

func runControl(args []string) error {
	fs := flag.NewFlagSet("tslab control", flag.ContinueOnError)
	adminAddr := fs.String("admin-addr", "127.0.0.1:0", "admin API listen address (127.0.0.1 only)")
	authKey := fs.String("auth-key", "", "if set, nodes must register with this auth key")
	requireLogin := fs.Bool("require-login", false, "new node keys get an interactive login URL, completed with POST /auth/complete")
	readyFile := fs.String("ready-file", "", "also write the ready JSON line to this file (atomically)")
	verbose := fs.Bool("v", false, "log to stderr")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: tslab control [flags]\n\n"+
			"Runs DERP, STUN, a test control server and an admin JSON API on 127.0.0.1.\n"+
			"Admin API: GET /nodes, GET|DELETE /nodes/{sel}, POST /nodes/{sel}/tags,\n"+
			"POST /nodes/{sel}/expire, GET|POST /caps/global, GET|PUT|DELETE /policy,\n"+
			"GET /services, GET|PUT|DELETE /services/{svc:name} (Tailscale Services: a VIP\n"+
			"routed to tagged nodes that advertise the Service; PUT body optional,\n"+
			"{\"ports\": [5432]}),\n"+
			"POST /auth/complete {\"url\": LOGIN_URL},\n"+
			"GET /control, POST /control/down|up (the control server unreachable, then back).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return parseError(err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	adminAP, err := netip.ParseAddrPort(*adminAddr)
	if err != nil || adminAP.Addr() != netip.AddrFrom4([4]byte{127, 0, 0, 1}) {
		return fmt.Errorf("--admin-addr %q: must be 127.0.0.1:PORT", *adminAddr)
	}
	if err := ensureLabEnv(); err != nil {
		return err
	}
	logf := setupLogging(*verbose, "tslab control: ")

	// Like tsnet's own tests: don't try to bind sockets to a physical
	// interface or set SO_MARK; everything here is loopback.
	netns.SetEnabled(false)

	ctx, cancel := signalContext()
	defer cancel()

	// Bind the admin listener first so a bad --admin-addr fails before
	// anything else starts.
	adminLn, err := net.Listen("tcp", adminAP.String())
	if err != nil {
		return err
	}
	l, err := startLab(logf, labConfig{authKey: *authKey, requireLogin: *requireLogin})
	if err != nil {
		adminLn.Close()
		return err
	}

	admin := &http.Server{
		Handler:           l.adminHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          logger.StdLogger(logf),
	}
	go admin.Serve(adminLn)

	if err := announceReady(controlReady{
		ControlURL:     l.ctrlHTTP.URL,
		AdminURL:       "http://" + adminLn.Addr().String(),
		DERPAddr:       l.derpHTTP.Listener.Addr().String(),
		STUNAddr:       l.stunPC.LocalAddr().String(),
		MagicDNSSuffix: magicDNSSuffix,
	}, *readyFile); err != nil {
		l.close()
		return err
	}

	<-ctx.Done()
	logf("shutting down")
	shutCtx, shutCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer shutCancel()
	admin.Shutdown(shutCtx)
	l.close()
	return nil
}

// startLab starts DERP, STUN and the control server (with the map
// manager) on 127.0.0.1. The caller serves l.adminHandler() if it wants
// the admin API, and calls l.close when done.
func startLab(logf logger.Logf, cfg labConfig) (*lab, error) {
	derpSrv, derpHTTP, err := startDERP(logf)
	if err != nil {
		return nil, err
	}
	stunPC, err := startSTUN(logf)
	if err != nil {
		derpHTTP.Close()
		derpSrv.Close()
		return nil, err
	}
	derpPort := derpHTTP.Listener.Addr().(*net.TCPAddr).Port
	stunPort := stunPC.LocalAddr().(*net.UDPAddr).Port

	l := &lab{logf: logf, derpSrv: derpSrv, derpHTTP: derpHTTP, stunPC: stunPC}
	l.ctrl = &testcontrol.Server{
		DERPMap:        labDERPMap(derpPort, stunPort),
		DNSConfig:      &tailcfg.DNSConfig{Proxied: true},
		MagicDNSDomain: magicDNSSuffix,
		Logf:           logf,
		// A non-nil TagOwners makes testcontrol give nodes the tags they
		// request (Hostinfo.RequestTags) at registration, unchecked.
		TagOwners:      map[string][]string{},
		AllOnline:      true,
		RequireAuthKey: cfg.authKey,
		// Like a real control server: a node key that completed login once
		// is not asked again (unlike RequireAuthKey, checked every time).
		RequireAuth: cfg.requireLogin,
	}
	l.mgr = newMapManager(l.ctrl, logf)
	// testcontrol reads HoldMapRequest without locking, so it must be
	// set before the server sees its first request.
	l.ctrl.HoldMapRequest = l.mgr.noteMapRequest

	ctrlLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		stunPC.Close()
		derpHTTP.Close()
		derpSrv.Close()
		return nil, err
	}
	l.ctrlHTTP = httptest.NewUnstartedServer(l.ctrl)
	l.ctrlHTTP.Listener.Close()
	l.gate = newGateListener(ctrlLn)
	l.ctrlHTTP.Listener = l.gate
	l.ctrlHTTP.Config.ErrorLog = logger.StdLogger(logf)
	l.ctrlHTTP.Start()
	l.ctrl.HTTPTestServer = l.ctrlHTTP

	var mgrCtx context.Context
	mgrCtx, l.stopMgr = context.WithCancel(context.Background())
	l.mgrDone = make(chan struct{})
	go func() {
		defer close(l.mgrDone)
		l.mgr.run(mgrCtx)
	}()
	return l, nil
}

// close stops everything startLab started.
func (l *lab) close() {
	l.stopMgr()
	<-l.mgrDone
	// Map polls are long-lived requests; drop them rather than wait out
	// their keep-alive timers. httptest.Server.Close waits for handlers,
	// so bound it: exiting is what matters.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	closeBounded(ctx, func() {
		l.ctrlHTTP.CloseClientConnections()
		l.ctrlHTTP.Close()
		l.derpHTTP.CloseClientConnections()
		l.derpHTTP.Close()
	})
	l.derpSrv.Close()
	l.stunPC.Close()
}

func closeBounded(ctx context.Context, f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// startDERP serves a DERP server over TLS (self-signed; clients skip
// verification because the DERP node is marked InsecureForTests).
func startDERP(logf logger.Logf) (*derpserver.Server, *httptest.Server, error) {
	d := derpserver.New(key.NewNode(), logf)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		d.Close()
		return nil, nil, err
	}
	hs := httptest.NewUnstartedServer(derpserver.Handler(d))
	hs.Listener.Close()
	hs.Listener = ln
	hs.Config.ErrorLog = logger.StdLogger(logf)
	// DERP upgrades an HTTP/1.1 connection; keep HTTP/2 out of ALPN.
	hs.Config.TLSNextProto = make(map[string]func(*http.Server, *tls.Conn, http.Handler))
	hs.StartTLS()
	return d, hs, nil
}

// startSTUN answers STUN binding requests on 127.0.0.1 so that netcheck
// completes and nodes pick the lab DERP region as home.
func startSTUN(logf logger.Logf) (*net.UDPConn, error) {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	go func() {
		var buf [64 << 10]byte
		for {
			n, src, err := pc.ReadFromUDPAddrPort(buf[:])
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					logf("stun: read: %v", err)
				}
				return
			}
			txid, err := stun.ParseBindingRequest(buf[:n])
			if err != nil {
				logf("stun: ignoring non-binding packet from %v: %v", src, err)
				continue
			}
			if _, err := pc.WriteToUDPAddrPort(stun.Response(txid, src), src); err != nil {
				logf("stun: write to %v: %v", src, err)
			}
		}
	}()
	return pc, nil
}

func labDERPMap(derpPort, stunPort int) *tailcfg.DERPMap {
	return &tailcfg.DERPMap{
		Regions: map[int]*tailcfg.DERPRegion{
			1: {
				RegionID:   1,
				RegionCode: "lab",
				RegionName: "Loopback lab",
				Nodes: []*tailcfg.DERPNode{{
					Name:             "1a",
					RegionID:         1,
					HostName:         "127.0.0.1",
					IPv4:             "127.0.0.1",
					IPv6:             "none",
					STUNPort:         stunPort,
					DERPPort:         derpPort,
					InsecureForTests: true,
					STUNTestIP:       "127.0.0.1",
				}},
			},
		},
	}
}

// nodeInfo is the admin API's view of a node.
type nodeInfo struct {
	ID        tailcfg.NodeID       `json:"id"`
	StableID  tailcfg.StableNodeID `json:"stable_id"`
	Name      string               `json:"name"`
	Hostname  string               `json:"hostname"`
	User      string               `json:"user"`
	Tags      []string             `json:"tags"`
	Addresses []string             `json:"addresses"`
	NodeKey   string               `json:"node_key"`
	Expired   bool                 `json:"expired"`
	Removed   bool                 `json:"removed"`
}

// snapshot returns all nodes known to control, sorted by ID.
func (l *lab) snapshot() []*tailcfg.Node {
	nodes := l.ctrl.AllNodes()
	slices.SortFunc(nodes, func(a, b *tailcfg.Node) int { return int(a.ID - b.ID) })
	return nodes
}

// userLogins maps user IDs to login names. testcontrol keeps logins
// private, but every MapResponse carries all user profiles.
func userLogins(ctrl *testcontrol.Server, nodes []*tailcfg.Node) map[tailcfg.UserID]string {
	m := map[tailcfg.UserID]string{}
	if len(nodes) == 0 {
		return m
	}
	mr, err := ctrl.MapResponse(&tailcfg.MapRequest{NodeKey: nodes[0].Key})
	if err != nil || mr == nil {
		return m
	}
	// MapResponse also takes the node's next queued c2n request (see
	// services.go); it isn't ours to drop.
	requeuePing(ctrl, nodes[0].Key, mr.PingRequest)
	for _, up := range mr.UserProfiles {
		m[up.ID] = up.LoginName
	}
	return m
}

func (l *lab) nodeInfos(nodes []*tailcfg.Node) []nodeInfo {
	users := userLogins(l.ctrl, nodes)
	now := time.Now()
	out := make([]nodeInfo, 0, len(nodes))
	for _, n := range nodes {
		ni := nodeInfo{
			ID:        n.ID,
			StableID:  n.StableID,
			Name:      strings.TrimSuffix(n.Name, "."),
			Hostname:  n.Hostinfo.Hostname(),
			User:      users[n.User],
			Tags:      append([]string{}, n.Tags...),
			Addresses: []string{},
			NodeKey:   n.Key.String(),
			Expired:   !n.KeyExpiry.IsZero() && n.KeyExpiry.Before(now),
			Removed:   l.mgr.isRemoved(n.StableID),
		}
		for _, p := range n.Addresses {
			ni.Addresses = append(ni.Addresses, p.Addr().String())
		}
		out = append(out, ni)
	}
	return out
}

// matchNodeSelector reports whether sel names n: by short hostname, full
// MagicDNS name (with or without the trailing dot), tailnet IP or stable
// ID. Names compare case-insensitively, like DNS.
func matchNodeSelector(n *tailcfg.Node, sel string) bool {
	if sel == "" {
		return false
	}
	if ip, err := netip.ParseAddr(sel); err == nil {
		return slices.ContainsFunc(n.Addresses, func(p netip.Prefix) bool { return p.Addr() == ip })
	}
	if string(n.StableID) == sel {
		return true
	}
	name := strings.TrimSuffix(sel, ".")
	return strings.EqualFold(name, n.Hostinfo.Hostname()) ||
		strings.EqualFold(name, strings.TrimSuffix(n.Name, "."))
}

// errStatus is an error carrying the HTTP status the admin API returns.
type errStatus struct {
	code int
	msg  string
}

func (e *errStatus) Error() string { return e.msg }

func statusErrorf(code int, format string, args ...any) error {
	return &errStatus{code, fmt.Sprintf(format, args...)}
}

// findNode resolves an admin API node selector to exactly one node.
// Re-registering a hostname (for instance with a fresh state directory)
// leaves the old node in testcontrol, so live nodes win over removed
// ones, and any remaining ambiguity is an error naming the candidates.
func (l *lab) findNode(sel string) (*tailcfg.Node, error) {
	var live, removed []*tailcfg.Node
	for _, n := range l.snapshot() {
		if !matchNodeSelector(n, sel) {
			continue
		}
		if l.mgr.isRemoved(n.StableID) {
			removed = append(removed, n)
		} else {
			live = append(live, n)
		}
	}
	cands := live
	if len(cands) == 0 {
		cands = removed
	}
	switch len(cands) {
	case 0:
		return nil, statusErrorf(http.StatusNotFound, "no node matches %q", sel)
	case 1:
		return cands[0], nil
	}
	var ids []string
	for _, n := range cands {
		ids = append(ids, string(n.StableID))
	}
	return nil, statusErrorf(http.StatusConflict, "%q matches several nodes (%s); use a stable ID", sel, strings.Join(ids, ", "))
}
