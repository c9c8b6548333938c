package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tailscale.com/net/netns"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/types/logger"
	"tailscale.com/types/views"
)

// TestMain runs the tests with the lab environment (lab.env), which
// tailscale.com partly reads at init: the binary re-executes itself with
// it if it is missing, as tslab itself does. Direct UDP paths are off, as
// for "tslab node" by default: everything crosses the lab DERP.
func TestMain(m *testing.M) {
	if err := ensureLabEnv(envVar{"TS_DEBUG_NEVER_DIRECT_UDP", "true"}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	netns.SetEnabled(false)
	if spec := os.Getenv(hostProcessEnv); spec != "" {
		os.Exit(serviceHostProcess(spec))
	}
	os.Exit(m.Run())
}

// loopbackOnly reports whether this process's network namespace holds
// only lo, so that nothing a test starts can reach beyond this machine.
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

// testLogf logs to t until the test's cleanups are done; background
// goroutines (c2n fetches, map polls) can outlive the test, and t.Logf
// would panic then. TSLAB_TEST_V=1 logs everything, tsnet nodes included,
// to stderr instead.
func testLogf(t *testing.T) logger.Logf {
	if os.Getenv("TSLAB_TEST_V") != "" {
		l := log.New(os.Stderr, "", log.Lmicroseconds)
		return l.Printf
	}
	var mu sync.Mutex
	done := false
	t.Cleanup(func() { // registered first: runs last
		mu.Lock()
		done = true
		mu.Unlock()
	})
	return func(format string, args ...any) {
		// The lab's decisions and changes; testcontrol and DERP (and the
		// test's polling of the admin API) are too chatty.
		if !strings.HasPrefix(format, "services:") && !strings.HasPrefix(format, "admin:") ||
			len(args) > 0 && args[0] == "GET" {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !done {
			t.Logf(format, args...)
		}
	}
}

func nodeLogf() logger.Logf {
	if os.Getenv("TSLAB_TEST_V") != "" {
		return log.New(os.Stderr, "", log.Lmicroseconds).Printf
	}
	return logger.Discard
}

// adminClient calls the lab's admin API.
type adminClient struct {
	t   *testing.T
	url string
}

func (a adminClient) do(method, path, body string, out any) error {
	req, err := http.NewRequest(method, a.url+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s: %s", method, path, res.Status, bytes.TrimSpace(b))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (a adminClient) service(name string) serviceInfo {
	a.t.Helper()
	var si serviceInfo
	if err := a.do("GET", "/services/"+name, "", &si); err != nil {
		a.t.Fatal(err)
	}
	return si
}

// routedTo returns the hostname of the host client is routed to, or "".
func (si serviceInfo) routedTo(client string) string {
	for _, r := range si.Routes {
		if r.Client.Hostname == client {
			return r.Host.Hostname
		}
	}
	return ""
}

func (si serviceInfo) hostnames() []string {
	var out []string
	for _, h := range si.Hosts {
		out = append(out, h.Hostname)
	}
	slices.Sort(out)
	return out
}

// waitFor polls cond until it returns nil, failing the test with its last
// error after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startTestNode brings up a tsnet node on the lab and waits for its home
// DERP, as "tslab node" does.
func startTestNode(ctx context.Context, dir, controlURL, hostname string, tags []string) (*tsnet.Server, error) {
	s := &tsnet.Server{
		Dir:           filepath.Join(dir, hostname),
		ControlURL:    controlURL,
		Hostname:      hostname,
		AdvertiseTags: tags,
		Logf:          nodeLogf(),
		UserLogf:      nodeLogf(),
	}
	if _, err := s.Up(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("%s: %w", hostname, err)
	}
	if err := waitHomeDERP(ctx, s); err != nil {
		s.Close()
		return nil, fmt.Errorf("%s: home DERP: %w", hostname, err)
	}
	return s, nil
}

// readProxyV2 reads a PROXY protocol v2 header (PROXY command, TCP over
// IPv4 or IPv6) and returns the source and destination it names.
func readProxyV2(r io.Reader) (src, dst netip.AddrPort, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return src, dst, err
	}
	if !bytes.Equal(hdr[:12], []byte("\r\n\r\n\x00\r\nQUIT\n")) {
		return src, dst, errors.New("no PROXY v2 signature")
	}
	if hdr[12] != 0x21 {
		return src, dst, fmt.Errorf("version/command %#x, want 0x21 (v2 PROXY)", hdr[12])
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[14:]))
	if _, err := io.ReadFull(r, body); err != nil {
		return src, dst, err
	}
	var n int
	switch hdr[13] {
	case 0x11: // TCP over IPv4
		n = 4
	case 0x21: // TCP over IPv6
		n = 16
	default:
		return src, dst, fmt.Errorf("family/protocol %#x, want TCP", hdr[13])
	}
	if len(body) < 2*n+4 {
		return src, dst, fmt.Errorf("address block of %d bytes", len(body))
	}
	sa, _ := netip.AddrFromSlice(body[:n])
	da, _ := netip.AddrFromSlice(body[n : 2*n])
	src = netip.AddrPortFrom(sa, binary.BigEndian.Uint16(body[2*n:]))
	dst = netip.AddrPortFrom(da, binary.BigEndian.Uint16(body[2*n+2:]))
	return src, dst, nil
}

// serveHost answers each connection on a Service listener with
// "HOSTNAME SOURCE-IP\n", SOURCE-IP taken from the PROXY v2 header.
func serveHost(ln net.Listener, hostname string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			src, _, err := readProxyV2(c)
			if err != nil {
				fmt.Fprintf(c, "ERROR %s %v\n", hostname, err)
				return
			}
			fmt.Fprintf(c, "%s %s\n", hostname, src.Addr())
		}()
	}
}

// askService connects from client to target and returns which host
// answered and the source address its PROXY header named.
func askService(ctx context.Context, client *tsnet.Server, target string, timeout time.Duration) (host string, src netip.Addr, err error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := client.Dial(ctx, "tcp", target)
	if err != nil {
		return "", src, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", src, fmt.Errorf("reading answer: %w", err)
	}
	f := strings.Fields(line)
	if len(f) != 2 {
		return "", src, fmt.Errorf("answer %q", line)
	}
	src, err = netip.ParseAddr(f[1])
	return f[0], src, err
}

// netmapHost returns the hostname of the one peer whose AllowedIPs carry
// vip in client's netmap; it is an error if none or several do.
func netmapHost(ctx context.Context, client *tsnet.Server, vip netip.Addr) (string, error) {
	lc, err := client.LocalClient()
	if err != nil {
		return "", err
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return "", err
	}
	var hosts []string
	for _, p := range st.Peer {
		if p.AllowedIPs != nil && views.SliceContains(*p.AllowedIPs, netip.PrefixFrom(vip, vip.BitLen())) {
			hosts = append(hosts, p.HostName)
		}
	}
	if len(hosts) != 1 {
		return "", fmt.Errorf("%v carry %v in the netmap, want exactly one peer", hosts, vip)
	}
	return hosts[0], nil
}

// serviceLab is a lab control with svc:db defined, and its nodes.
type serviceLab struct {
	t          *testing.T
	ctx        context.Context
	admin      adminClient
	controlURL string
	dir        string
	vip4, vip6 netip.Addr

	mu    sync.Mutex
	nodes map[string]*tsnet.Server
}

func newServiceLab(t *testing.T) *serviceLab {
	if !loopbackOnly() {
		t.Skip("starts a lab tailnet: run in a network namespace holding only lo " +
			"(unshare --net, as .ci/run does)")
	}
	logf := testLogf(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)

	l, err := startLab(logf, labConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.close)
	adminSrv := httptest.NewServer(l.adminHandler())
	t.Cleanup(adminSrv.Close)
	sl := &serviceLab{
		t:          t,
		ctx:        ctx,
		admin:      adminClient{t, adminSrv.URL},
		controlURL: l.ctrlHTTP.URL,
		dir:        t.TempDir(),
		nodes:      map[string]*tsnet.Server{},
	}
	var created serviceInfo
	if err := sl.admin.do("PUT", "/services/svc:db", `{"ports": [5432]}`, &created); err != nil {
		t.Fatal(err)
	}
	if len(created.Addresses) != 2 || created.DNSName != "db."+magicDNSSuffix {
		t.Fatalf("PUT /services/svc:db: %+v", created)
	}
	sl.vip4, sl.vip6 = netip.MustParseAddr(created.Addresses[0]), netip.MustParseAddr(created.Addresses[1])
	return sl
}

// startNodes starts in-process nodes, concurrently. Those named db-* are
// tagged at registration (AdvertiseTags becomes Hostinfo.RequestTags,
// which the lab's testcontrol honours), so ListenService doesn't refuse
// them as untagged.
func (sl *serviceLab) startNodes(names ...string) {
	t := sl.t
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(names))
	start := time.Now()
	for _, name := range names {
		wg.Go(func() {
			s, err := startTestNode(sl.ctx, sl.dir, sl.controlURL, name, hostTags(name))
			if err != nil {
				errs <- err
				return
			}
			sl.mu.Lock()
			sl.nodes[name] = s
			sl.mu.Unlock()
		})
	}
	wg.Wait()
	for _, name := range names {
		if s := sl.node(name); s != nil {
			t.Cleanup(func() { s.Close() })
		}
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d nodes up in %v", len(names), time.Since(start).Round(time.Millisecond))
}

func hostTags(name string) []string {
	if strings.HasPrefix(name, "db-") {
		return []string{"tag:db"}
	}
	return nil
}

func (sl *serviceLab) node(name string) *tsnet.Server {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	return sl.nodes[name]
}

// listen makes host serve svc:db on port 5432 as tailgres does.
func (sl *serviceLab) listen(host string) *tsnet.ServiceListener {
	sl.t.Helper()
	ln, err := sl.node(host).ListenService("svc:db", tsnet.ServiceModeTCP{Port: 5432, PROXYProtocolVersion: 2})
	if err != nil {
		sl.t.Fatalf("%s: ListenService: %v", host, err)
	}
	sl.t.Cleanup(func() { ln.Close() })
	go serveHost(ln, host)
	return ln
}

// waitSpread waits until the lab has the hosts, the clients (every live
// node that doesn't host) spread over them, as many hosts used as can
// be, and each client's netmap routes both VIPs through exactly its
// host.
func (sl *serviceLab) waitSpread(hosts, clients []string) {
	t := sl.t
	t.Helper()
	t0 := time.Now()
	waitFor(t, 20*time.Second, fmt.Sprintf("hosts %v, clients %v spread over them", hosts, clients), func() error {
		si := sl.admin.service("svc:db")
		used := map[string]bool{}
		for _, c := range clients {
			if h := si.routedTo(c); h != "" {
				used[h] = true
			}
		}
		if !slices.Equal(si.hostnames(), hosts) || len(si.Routes) != len(clients) || len(used) != min(len(hosts), len(clients)) {
			return fmt.Errorf("hosts %v, routes %+v", si.hostnames(), si.Routes)
		}
		return nil
	})
	t.Logf("hosts and routes in place after %v", time.Since(t0).Round(time.Millisecond))
	for _, c := range clients {
		waitFor(t, 10*time.Second, c+"'s netmap", func() error {
			want := sl.admin.service("svc:db").routedTo(c)
			for _, vip := range []netip.Addr{sl.vip4, sl.vip6} {
				h, err := netmapHost(sl.ctx, sl.node(c), vip)
				if err != nil {
					return err
				}
				if h != want {
					return fmt.Errorf("%v routed to %s in the netmap, to %s by the lab", vip, h, want)
				}
			}
			return nil
		})
	}
}

// ask connects from client to target; it checks that the host's PROXY
// header names the client, and returns the host.
func (sl *serviceLab) ask(client, target string, timeout time.Duration) (string, error) {
	c := sl.node(client)
	host, src, err := askService(sl.ctx, c, target, timeout)
	if err != nil {
		return "", err
	}
	ip4, ip6 := c.TailscaleIPs()
	if src != ip4 && src != ip6 {
		return "", fmt.Errorf("%s reached %s with PROXY source %v, not its own address", client, host, src)
	}
	return host, nil
}

// askRouted waits until client's connections to target land on the host
// the lab routes it to (its netmap may trail the admin API a little).
func (sl *serviceLab) askRouted(client, target string) string {
	sl.t.Helper()
	var host string
	waitFor(sl.t, 10*time.Second, client+" reaches its host at "+target, func() error {
		want := sl.admin.service("svc:db").routedTo(client)
		h, err := sl.ask(client, target, 2*time.Second)
		if err != nil {
			return err
		}
		if h != want {
			return fmt.Errorf("landed on %s, routed to %s", h, want)
		}
		host = h
		return nil
	})
	return host
}

var serviceFQDN = "db." + magicDNSSuffix + ":5432"

// moved ends host gone's part in the Service with do, and measures how
// long until the lab routes client (which was on gone) elsewhere, until
// the client's netmap says so, and until its next connection lands on a
// live host. It fails the test if that takes over limit.
func (sl *serviceLab) moved(what, client, gone string, limit time.Duration, do func()) {
	t := sl.t
	t.Helper()
	t0 := time.Now()
	do()
	var rerouted, inNetmap time.Duration
	waitFor(t, 10*time.Second, what+": lab stops routing to "+gone, func() error {
		si := sl.admin.service("svc:db")
		if h := si.routedTo(client); slices.Contains(si.hostnames(), gone) || h == "" || h == gone {
			return fmt.Errorf("hosts %v, %s routed to %q", si.hostnames(), client, h)
		}
		rerouted = time.Since(t0)
		return nil
	})
	waitFor(t, 10*time.Second, what+": "+client+"'s netmap routes to a live host", func() error {
		h, err := netmapHost(sl.ctx, sl.node(client), sl.vip4)
		if err != nil {
			return err
		}
		if h == gone {
			return fmt.Errorf("still routed to %s", gone)
		}
		inNetmap = time.Since(t0)
		return nil
	})
	var host string
	waitFor(t, 10*time.Second, what+": "+client+" lands on a live host", func() error {
		// Short tries: one sent before the new netmap arrived goes to
		// the old host and may hang.
		h, err := sl.ask(client, serviceFQDN, 250*time.Millisecond)
		if err != nil {
			return err
		}
		if h == gone {
			return fmt.Errorf("still landing on %s", gone)
		}
		host = h
		return nil
	})
	d := time.Since(t0)
	t.Logf("%s %s: lab re-routed %s after %v, its netmap had the new route after %v, its next connection landed on %s after %v",
		what, gone, client, rerouted.Round(time.Millisecond), inNetmap.Round(time.Millisecond), host, d.Round(time.Millisecond))
	if d > limit {
		t.Errorf("%s: %s took %v to reach a live host, more than %v", what, client, d, limit)
	}
}

// TestServices: three tagged nodes host svc:db with tsnet's ListenService
// (PROXY protocol v2), three untagged clients reach it by name. Clients
// are spread over the hosts; a host that withdraws (closes its
// ServiceListener) and a host that stops (closes its tsnet.Server) lose
// their clients to a live host within seconds; a client tagged through
// the admin API becomes a host and takes a client over.
func TestServices(t *testing.T) {
	sl := newServiceLab(t)
	hostNames := []string{"db-1", "db-2", "db-3"}
	clientNames := []string{"app-1", "app-2", "app-3"}
	sl.startNodes(slices.Concat(hostNames, clientNames)...)
	listeners := map[string]*tsnet.ServiceListener{}
	for _, h := range hostNames {
		listeners[h] = sl.listen(h)
	}
	sl.waitSpread(hostNames, clientNames)

	// Each client reaches the Service by its MagicDNS name, on the host
	// the lab routes it to, and the host's PROXY header names the client.
	landed := map[string]string{}
	distinct := map[string]bool{}
	for _, c := range clientNames {
		landed[c] = sl.askRouted(c, serviceFQDN)
		distinct[landed[c]] = true
	}
	if len(distinct) != 3 {
		t.Fatalf("clients landed on %v, want three different hosts", landed)
	}
	t.Logf("clients landed on %v", landed)

	// The short name and both VIPs work too.
	c0 := clientNames[0]
	for _, target := range []string{"db:5432", netip.AddrPortFrom(sl.vip4, 5432).String(), netip.AddrPortFrom(sl.vip6, 5432).String()} {
		if h := sl.askRouted(c0, target); h != landed[c0] {
			t.Errorf("%s via %s landed on %s, not %s", c0, target, h, landed[c0])
		}
	}

	// "tslab node --forward" accepts the Service's names as targets, and
	// still refuses names nothing has.
	ln := &labNode{srv: sl.node(c0), suffix: magicDNSSuffix}
	for _, target := range []string{serviceFQDN, "db:5432"} {
		if err := ln.checkTargetKnown(sl.ctx, target); err != nil {
			t.Errorf("--forward target %s: %v", target, err)
		}
	}
	for _, target := range []string{"nope." + magicDNSSuffix + ":5432", "nope:5432"} {
		if err := ln.checkTargetKnown(sl.ctx, target); err == nil {
			t.Errorf("--forward target %s accepted", target)
		}
	}

	// Withdraw: the first client's host closes its ServiceListener.
	withdrawn := landed[c0]
	sl.moved("withdraw", c0, withdrawn, 5*time.Second, func() { listeners[withdrawn].Close() })

	// Stop: the second client's host shuts its node down.
	c1 := clientNames[1]
	stopped := landed[c1]
	sl.moved("stop", c1, stopped, 5*time.Second, func() { sl.node(stopped).Close() })

	// Everyone is on the one host left, and gets there.
	var last string
	for _, h := range hostNames {
		if h != withdrawn && h != stopped {
			last = h
		}
	}
	waitFor(t, 10*time.Second, "one host left", func() error {
		if h := sl.admin.service("svc:db").hostnames(); !slices.Equal(h, []string{last}) {
			return fmt.Errorf("hosts %v", h)
		}
		return nil
	})
	for _, c := range clientNames {
		if h := sl.askRouted(c, serviceFQDN); h != last {
			t.Errorf("%s landed on %s, want %s", c, h, last)
		}
	}

	// A node tagged through the admin API after registering untagged can
	// host too, once its netmap shows the tag; it takes a client. The
	// clients now include the host that withdrew: it reaches the Service
	// like any other node.
	joiner := clientNames[2]
	if _, err := sl.node(joiner).ListenService("svc:db", tsnet.ServiceModeTCP{Port: 5432}); !errors.Is(err, tsnet.ErrUntaggedServiceHost) {
		t.Fatalf("untagged %s: ListenService: %v, want ErrUntaggedServiceHost", joiner, err)
	}
	if err := sl.admin.do("POST", "/nodes/"+joiner+"/tags", `{"tags": ["tag:db"]}`, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, joiner+" sees its tag", func() error {
		lc, err := sl.node(joiner).LocalClient()
		if err != nil {
			return err
		}
		st, err := lc.StatusWithoutPeers(sl.ctx)
		if err != nil {
			return err
		}
		if st.Self.Tags == nil || st.Self.Tags.Len() == 0 {
			return errors.New("no tags yet")
		}
		return nil
	})
	sl.listen(joiner)
	clients := []string{clientNames[0], clientNames[1], withdrawn}
	sl.waitSpread([]string{joiner, last}, clients)
	for _, c := range clients {
		sl.askRouted(c, serviceFQDN)
	}

	// Deleting the Service takes it out of the API.
	if err := sl.admin.do("DELETE", "/services/db", "", nil); err != nil {
		t.Fatal(err)
	}
	var all []serviceInfo
	if err := sl.admin.do("GET", "/services", "", &all); err != nil || len(all) != 0 {
		t.Fatalf("GET /services after DELETE: %v, %+v", err, all)
	}
}

// hostProcessEnv, when set (to CONTROL_URL DIR HOSTNAME), makes the test
// binary a Service host process instead (see TestMain): what
// TestServiceHostKilled SIGKILLs.
const hostProcessEnv = "TSLAB_TEST_SERVICE_HOST"

// serviceHostProcess hosts svc:db like TestServices's hosts, prints
// "ready" and waits to be killed.
func serviceHostProcess(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 3 {
		fmt.Fprintf(os.Stderr, "%s=%q: want CONTROL_URL DIR HOSTNAME\n", hostProcessEnv, spec)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := startTestNode(ctx, f[1], f[0], f[2], hostTags(f[2]))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := s.ListenService("svc:db", tsnet.ServiceModeTCP{Port: 5432, PROXYProtocolVersion: 2})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	go serveHost(ln, f[2])
	fmt.Println("ready")
	time.Sleep(2 * time.Minute)
	fmt.Fprintln(os.Stderr, "not killed")
	return 1
}

// TestServiceHostKilled: a host process that is SIGKILLed (no goodbye to
// control) loses its client to the other host within about a second: its
// map poll's connection closes with the process. Then the control server
// goes down and comes back, and the remaining host serves again.
func TestServiceHostKilled(t *testing.T) {
	sl := newServiceLab(t)
	clientNames := []string{"app-1", "app-2"}
	sl.startNodes("db-1", "app-1", "app-2")

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), hostProcessEnv+"="+sl.controlURL+" "+sl.dir+" db-k")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("said %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("host process: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("host process not ready after 30s")
	}
	sl.listen("db-1")
	sl.waitSpread([]string{"db-1", "db-k"}, clientNames)

	var victim string
	for _, c := range clientNames {
		if h := sl.askRouted(c, serviceFQDN); h == "db-k" {
			victim = c
		}
	}
	if victim == "" {
		t.Fatal("no client landed on the host process")
	}
	sl.moved("SIGKILL", victim, "db-k", 2*time.Second, func() {
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	})

	// The control server down and up again: every map poll is cut, so
	// the host is confirmed anew (c2n) when it returns, and its clients
	// are routed to it again.
	if err := sl.admin.do("POST", "/control/down", "", nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "no hosts while control is down", func() error {
		if h := sl.admin.service("svc:db").hostnames(); len(h) != 0 {
			return fmt.Errorf("hosts %v", h)
		}
		return nil
	})
	t0 := time.Now()
	if err := sl.admin.do("POST", "/control/up", "", nil); err != nil {
		t.Fatal(err)
	}
	sl.waitSpread([]string{"db-1"}, clientNames)
	for _, c := range clientNames {
		sl.askRouted(c, serviceFQDN)
	}
	t.Logf("control back: clients reach db-1 again %v after /control/up", time.Since(t0).Round(time.Millisecond))
}

// assignClients spreads clients, keeps them on their host, and moves as
// few as balance needs when hosts come and go.
func TestAssignClients(t *testing.T) {
	prev := map[tailcfg.NodeID]tailcfg.NodeID{}
	clients := []tailcfg.NodeID{1, 2, 3, 4}
	step := func(hosts []tailcfg.NodeID, want map[tailcfg.NodeID]tailcfg.NodeID) {
		t.Helper()
		got := assignClients(clients, hosts, prev)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("hosts %v: got %v, want %v", hosts, got, want)
		}
	}
	step(nil, map[tailcfg.NodeID]tailcfg.NodeID{})
	step([]tailcfg.NodeID{10}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 3: 10, 4: 10})
	// A host joins: only what is above the new share moves.
	step([]tailcfg.NodeID{10, 11}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 3: 11, 4: 11})
	step([]tailcfg.NodeID{10, 11, 12}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 3: 11, 4: 12})
	// Hosts listed in another order change nothing.
	step([]tailcfg.NodeID{12, 10, 11}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 3: 11, 4: 12})
	// A host goes: its clients move, nobody else does.
	step([]tailcfg.NodeID{10, 12}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 3: 12, 4: 12})
	// A client goes offline and comes back: it returns to its host.
	clients = []tailcfg.NodeID{1, 2, 4}
	step([]tailcfg.NodeID{10, 12}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 4: 12})
	clients = []tailcfg.NodeID{1, 2, 3, 4}
	step([]tailcfg.NodeID{10, 12}, map[tailcfg.NodeID]tailcfg.NodeID{1: 10, 2: 10, 3: 12, 4: 12})
}

// A Service with ports opens only those on its VIPs; the node's own
// addresses keep the rule's ports.
func TestRestrictServicePorts(t *testing.T) {
	self := &tailcfg.Node{Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")}}
	svc := &labService{Name: "svc:db", Addrs: []netip.Addr{netip.MustParseAddr("100.96.0.1")}, Ports: []uint16{5432, 6000}}
	rules := []tailcfg.FilterRule{
		{SrcIPs: []string{"*"}, DstPorts: []tailcfg.NetPortRange{{IP: "*", Ports: tailcfg.PortRange{First: 5000, Last: 7000}}}},
		{SrcIPs: []string{"*"}, CapGrant: []tailcfg.CapGrant{{}}},
	}
	got := restrictServicePorts(rules, self, []*labService{svc})
	want := []tailcfg.NetPortRange{
		{IP: "100.64.0.1", Ports: tailcfg.PortRange{First: 5000, Last: 7000}},
		{IP: "100.96.0.1", Ports: tailcfg.PortRange{First: 5432, Last: 5432}},
		{IP: "100.96.0.1", Ports: tailcfg.PortRange{First: 6000, Last: 6000}},
	}
	if fmt.Sprint(got[0].DstPorts) != fmt.Sprint(want) || len(got[1].CapGrant) != 1 || rules[0].DstPorts[0].IP != "*" {
		t.Fatalf("got %+v", got)
	}
	if open := restrictServicePorts(rules, self, []*labService{{Name: "svc:x"}}); fmt.Sprint(open[0].DstPorts) != fmt.Sprint(rules[0].DstPorts) {
		t.Fatalf("a Service without ports changed the filter: %+v", open)
	}
}
