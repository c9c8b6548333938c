package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"tailscale.com/net/netaddr"
	"tailscale.com/net/tsaddr"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/util/set"
)

// Tailscale Services in the lab.
//
// A Service (svc:NAME) is defined through the admin API, which gives it a
// virtual IP (VIP) pair. Nodes host it with tsnet's ListenService: that
// adds NAME to the node's AdvertiseServices pref and a handler to its
// serve config. This tailscale version tells control only a hash of that
// (Hostinfo.ServicesHash); the list itself is fetched with a c2n request,
// GET /vip-services, whenever the hash changes or the node starts a new
// map poll (a restarted process may report its predecessor's hash until it
// updates its Hostinfo, so only an answer from the current poll counts).
//
// A node hosts a Service while it is tagged, not removed or expired, its
// answer lists the Service as active with at least one port (ListenService
// advertises before it installs its handler; a port says the handler is
// there), and its map poll is connected. Such a node gets the
// NodeAttrServiceHost capability naming the Service's VIPs (its netstack
// then accepts them) and the VIPs in its own AllowedIPs, as
// setUpServiceState in tsnet's tests does. Once it has hosted a Service
// the node counts as approved for it, as an admin's approval on Tailscale's
// control plane does: it keeps the capability (tailcfg: "the VIP Services
// for which the client is approved to act as a service host") after it
// stops advertising, so connections already routed to it go on while its
// clients move to the other hosts (a drain), but no client is routed to it. Every other node (a client)
// gets, in its netmap, the VIPs in the AllowedIPs of exactly one host
// peer, plus MagicDNS records for the Service's name.
//
// Clients are only routed to a host once the host has been sent a netmap
// with its capability during its current poll, so that a client's first
// SYN doesn't reach a host whose netstack doesn't know the VIP yet.
//
// Assignment (see assignClients): clients spread over the hosts (loads
// differ by at most one); each keeps its host while the host lives and
// is within its share, so a host's clients move to the others when it
// goes, and a host that joins takes over only what is above the others'
// new share.
//
// The MagicDNS records are NAME.tail-lab.ts.net (A and AAAA) and the
// short NAME (A), which tsnet's Dial resolves from the netmap.
//
// Access follows the lab's packet filters for the host node: without a
// policy every node may connect, with one whoever may reach the host node
// (on those ports) may reach the VIP there. A Service defined with ports
// opens only those ports of its VIPs (restrictServicePorts).

const (
	// c2nTimeout bounds one GET /vip-services round trip.
	c2nTimeout = 5 * time.Second
	// c2nRetry is how long after a failed fetch the next one may start.
	c2nRetry = time.Second
)

// vipBlock is where Service VIPs come from: 100.96.0.0/16 and its
// Tailscale4To6 image. testcontrol numbers nodes 100.64.X.Y from their node
// ID (100.64.0.0/16, IPv6 likewise), so the two never meet. The addresses
// must be Tailscale IPs: clients route single Tailscale IPs in a peer's
// AllowedIPs without --accept-routes (net/routemanager), as they must for
// VIPs.
var vipBlock = [2]byte{100, 96}

// labService is one Service defined through the admin API.
type labService struct {
	Name  tailcfg.ServiceName
	Addrs []netip.Addr // IPv4 VIP, then IPv6 VIP
	Ports []uint16     // TCP ports open on the VIPs; empty: all
}

func (s *labService) prefixes() []netip.Prefix {
	var out []netip.Prefix
	for _, a := range s.Addrs {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out
}

// advert is what a node last said it advertises (c2n GET /vip-services).
type advert struct {
	hash      string                       // the ServicesHash that answer came with
	services  set.Set[tailcfg.ServiceName] // active, with a port
	fetchedAt time.Time                    // when the answer was asked for
	// The latest fetch: its number (answers to older ones are dropped),
	// start, and whether it is still out.
	fetchSeq     int
	fetchStarted time.Time
	fetching     bool
	askedFor     string    // the Hostinfo.ServicesHash the last fetch was for
	retryAt      time.Time // after a failure
}

// servicePlan is one sync's view of the Services: who hosts what and
// which host each client is routed to.
type servicePlan struct {
	services []*labService // by name
	// hosting: the Services each node gets the host capability for.
	hosting map[tailcfg.NodeID][]*labService
	// hosts: per Service, the hosts clients are routed to, by node ID.
	hosts map[tailcfg.ServiceName][]tailcfg.NodeID
	// route: per Service, client node → host node.
	route map[tailcfg.ServiceName]map[tailcfg.NodeID]tailcfg.NodeID
	nodes map[tailcfg.NodeID]*tailcfg.Node
}

// peerRoutes returns, for client self, the VIP prefixes to add to each
// host peer's AllowedIPs.
func (p *servicePlan) peerRoutes(self tailcfg.NodeID) map[tailcfg.NodeID][]netip.Prefix {
	var out map[tailcfg.NodeID][]netip.Prefix
	for _, s := range p.services {
		if h, ok := p.route[s.Name][self]; ok {
			if out == nil {
				out = map[tailcfg.NodeID][]netip.Prefix{}
			}
			out[h] = append(out[h], s.prefixes()...)
		}
	}
	return out
}

// parseServiceName accepts "svc:NAME" or a bare "NAME".
func parseServiceName(s string) (tailcfg.ServiceName, error) {
	if !strings.HasPrefix(s, "svc:") {
		s = "svc:" + s
	}
	name := tailcfg.ServiceName(s)
	if err := name.Validate(); err != nil {
		return "", fmt.Errorf("bad Service name %q: %w", s, err)
	}
	return name, nil
}

// putService defines a Service, or changes its ports, keeping its VIPs.
func (m *mapManager) putService(name tailcfg.ServiceName, ports []uint16) (*labService, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s, ok := m.services[name]; ok {
		s = &labService{Name: name, Addrs: s.Addrs, Ports: ports}
		m.services[name] = s
		m.kickNow()
		return s, nil
	}
	// VIPs are never reused, so a client's stale route to a deleted
	// Service can't capture a new one's traffic.
	if m.vipNext >= 1<<16-1 {
		return nil, errors.New("out of Service addresses")
	}
	m.vipNext++
	v4 := netaddr.IPv4(vipBlock[0], vipBlock[1], uint8(m.vipNext>>8), uint8(m.vipNext))
	s := &labService{Name: name, Addrs: []netip.Addr{v4, tsaddr.Tailscale4To6(v4)}, Ports: ports}
	if m.services == nil {
		m.services = map[tailcfg.ServiceName]*labService{}
	}
	m.services[name] = s
	m.kickNow()
	return s, nil
}

func (m *mapManager) deleteService(name tailcfg.ServiceName) (*labService, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.services[name]
	delete(m.services, name)
	m.kickNow()
	return s, ok
}

// servicesSortedLocked returns the defined Services by name. m.mu must be held.
func (m *mapManager) servicesSortedLocked() []*labService {
	out := make([]*labService, 0, len(m.services))
	for _, s := range m.services {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *labService) int { return strings.Compare(string(a.Name), string(b.Name)) })
	return out
}

// planServices works out this sync's hosts and routes, and starts c2n
// fetches for nodes whose advertisement is unknown or out of date. It
// runs on the run goroutine (it reads m.sent and keeps m.assign).
func (m *mapManager) planServices(snap syncSnapshot, nodes []*tailcfg.Node) *servicePlan {
	plan := &servicePlan{
		services: snap.services,
		hosting:  map[tailcfg.NodeID][]*labService{},
		hosts:    map[tailcfg.ServiceName][]tailcfg.NodeID{},
		route:    map[tailcfg.ServiceName]map[tailcfg.NodeID]tailcfg.NodeID{},
		nodes:    map[tailcfg.NodeID]*tailcfg.Node{},
	}
	now := time.Now()
	var live []*tailcfg.Node // online, not removed or expired; by ID
	advertised := map[tailcfg.NodeID]set.Set[tailcfg.ServiceName]{}
	type fetch struct {
		nk  key.NodePublic
		seq int
	}
	var fetches []fetch
	m.mu.Lock()
	for _, n := range nodes {
		plan.nodes[n.ID] = n
		st := snap.streams[n.Key]
		if snap.removed.Contains(n.StableID) || (!n.KeyExpiry.IsZero() && n.KeyExpiry.Before(now)) || st.live == 0 {
			continue
		}
		live = append(live, n)
		hash := n.Hostinfo.ServicesHash()
		if hash == "" {
			continue // advertises nothing; no need to ask
		}
		a := m.adverts[n.Key]
		if a == nil {
			a = &advert{}
			ensureMap(&m.adverts)[n.Key] = a
		}
		current := a.fetchedAt.After(st.start)
		// A fetch still out from before this poll may have lost its
		// request with the old poll: don't wait for its timeout.
		idle := !a.fetching || a.fetchStarted.Before(st.start)
		if idle && now.After(a.retryAt) && (!current || (hash != a.hash && hash != a.askedFor)) {
			a.fetchSeq++
			a.fetchStarted = now
			a.fetching = true
			a.askedFor = hash
			fetches = append(fetches, fetch{n.Key, a.fetchSeq})
		}
		// While a fetch for a changed hash is in flight, the previous
		// answer from this poll stands: a host adding a port shouldn't
		// lose its clients for a round trip.
		if current && len(n.Tags) > 0 {
			advertised[n.ID] = a.services
		}
	}
	// Forget nodes control no longer has.
	for k := range m.adverts {
		if !slices.ContainsFunc(nodes, func(n *tailcfg.Node) bool { return n.Key == k }) {
			delete(m.adverts, k)
		}
	}
	for id := range m.approved {
		if !slices.ContainsFunc(nodes, func(n *tailcfg.Node) bool { return n.StableID == id }) || snap.removed.Contains(id) {
			delete(m.approved, id)
		}
	}
	// Approval follows advertising, and outlasts it (see the top).
	approved := map[tailcfg.NodeID]set.Set[tailcfg.ServiceName]{}
	for _, n := range live {
		if len(n.Tags) == 0 {
			continue
		}
		for name := range advertised[n.ID] {
			if m.approved[n.StableID] == nil {
				ensureMap(&m.approved)[n.StableID] = set.Set[tailcfg.ServiceName]{}
			}
			m.approved[n.StableID].Add(name)
		}
		approved[n.ID] = m.approved[n.StableID]
	}
	m.mu.Unlock()
	for _, f := range fetches {
		go m.fetchAdvert(f.nk, f.seq)
	}
	slices.SortFunc(live, func(a, b *tailcfg.Node) int { return int(a.ID - b.ID) })

	for name := range m.assign {
		if !slices.ContainsFunc(snap.services, func(s *labService) bool { return s.Name == name }) {
			delete(m.assign, name)
		}
	}
	for _, s := range snap.services {
		var hosts []tailcfg.NodeID
		var clients []tailcfg.NodeID
		for _, n := range live {
			if !advertised[n.ID].Contains(s.Name) {
				if approved[n.ID].Contains(s.Name) {
					// Withdrawn: keeps the capability (it still accepts
					// what was routed to it) but gets no clients, and is
					// routed to a host like any client (its netstack lets
					// packets for a Service it does not advertise through).
					plan.hosting[n.ID] = append(plan.hosting[n.ID], s)
				}
				clients = append(clients, n.ID)
				continue
			}
			plan.hosting[n.ID] = append(plan.hosting[n.ID], s)
			last := m.sent[n.Key]
			if last.at.After(snap.streams[n.Key].start) && slices.Contains(last.hosting, s.Name) {
				hosts = append(hosts, n.ID)
			}
		}
		plan.hosts[s.Name] = hosts
		if m.assign[s.Name] == nil {
			ensureMap(&m.assign)[s.Name] = map[tailcfg.NodeID]tailcfg.NodeID{}
		}
		plan.route[s.Name] = assignClients(clients, hosts, m.assign[s.Name])
	}
	return plan
}

// ensureMap returns *m, making the map first if it is nil.
func ensureMap[K comparable, V any](m *map[K]V) map[K]V {
	if *m == nil {
		*m = map[K]V{}
	}
	return *m
}

// assignClients routes each client (online, by ID) to one of hosts (by
// ID). prev is the previous assignment; it is updated, and keeps the
// entries of clients that are offline now so they return to their host.
//
// Each host's share is clients/hosts, and clients%hosts of them take one
// more. A client keeps its host if the host is still there and not yet
// at its share; the others go, in ID order, to the host with the fewest
// (the first of them on a tie). So loads differ by at most one, and
// clients only move when their host goes or a host joins, and then as
// few as balance needs: a move cuts the client's connections to the VIP.
func assignClients(clients, hosts []tailcfg.NodeID, prev map[tailcfg.NodeID]tailcfg.NodeID) map[tailcfg.NodeID]tailcfg.NodeID {
	out := map[tailcfg.NodeID]tailcfg.NodeID{}
	if len(hosts) == 0 {
		return out
	}
	base, extra := len(clients)/len(hosts), len(clients)%len(hosts)
	load := map[tailcfg.NodeID]int{}
	keep := func(c tailcfg.NodeID, full func(load int) bool) {
		if _, done := out[c]; done {
			return
		}
		if h, ok := prev[c]; ok && slices.Contains(hosts, h) && !full(load[h]) {
			out[c] = h
			load[h]++
		}
	}
	for _, c := range clients {
		keep(c, func(n int) bool { return n >= base })
	}
	for _, c := range clients {
		keep(c, func(n int) bool {
			if n > base || extra == 0 {
				return true
			}
			extra--
			return false
		})
	}
	for _, c := range clients {
		if _, ok := out[c]; ok {
			continue
		}
		best := hosts[0]
		for _, h := range hosts[1:] {
			if load[h] < load[best] {
				best = h
			}
		}
		out[c] = best
		load[best]++
	}
	for c, h := range out {
		prev[c] = h
	}
	return out
}

// fetchAdvert asks node nk which Services it advertises; seq numbers
// the fetch (see advert).
func (m *mapManager) fetchAdvert(nk key.NodePublic, seq int) {
	started := time.Now()
	svcs, hash, err := m.queryVIPServices(nk)
	m.mu.Lock()
	a := m.adverts[nk]
	if a == nil || a.fetchSeq != seq {
		m.mu.Unlock()
		return // superseded
	}
	a.fetching = false
	if err != nil {
		a.askedFor = ""
		a.retryAt = time.Now().Add(c2nRetry)
	} else {
		a.hash, a.services, a.fetchedAt = hash, svcs, started
	}
	m.mu.Unlock()
	if err != nil {
		m.logf("services: GET /vip-services from %s: %v", nk.ShortString(), err)
		return
	}
	m.logf("services: %s advertises %v (hash %.8s)", nk.ShortString(), svcs.Slice(), hash)
	m.kickNow()
}

// queryVIPServices makes the c2n request GET /vip-services, the way a
// real control server learns what a node advertises.
func (m *mapManager) queryVIPServices(nk key.NodePublic) (set.Set[tailcfg.ServiceName], string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c2nTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", "/vip-services", nil)
	if err != nil {
		return nil, "", err
	}
	res, err := m.ctrl.NodeRoundTripper(nk).RoundTrip(req)
	if err != nil {
		return nil, "", err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, maxBody))
	if err != nil {
		return nil, "", err
	}
	if res.StatusCode != http.StatusOK {
		return nil, "", fmt.Errorf("%s: %s", res.Status, strings.TrimSpace(string(body)))
	}
	var vr tailcfg.C2NVIPServicesResponse
	if err := json.Unmarshal(body, &vr); err != nil {
		return nil, "", fmt.Errorf("decoding answer: %w", err)
	}
	svcs := set.Set[tailcfg.ServiceName]{}
	for _, s := range vr.VIPServices {
		if s != nil && s.Active && len(s.Ports) > 0 {
			svcs.Add(s.Name)
		}
	}
	return svcs, vr.ServicesHash, nil
}

// applyServices adds the plan's Services to self's netmap: the host
// capability, VIPs and port limits if self hosts any, routes to the host
// peers self is assigned to, and the Services' MagicDNS records.
func applyServices(mr *tailcfg.MapResponse, self *tailcfg.Node, plan *servicePlan) {
	if plan == nil || len(plan.services) == 0 {
		return
	}
	if hosted := plan.hosting[self.ID]; len(hosted) > 0 && mr.Node != nil {
		ips := tailcfg.ServiceIPMappings{}
		for _, s := range hosted {
			ips[s.Name] = s.Addrs
			mr.Node.AllowedIPs = append(slices.Clone(mr.Node.AllowedIPs), s.prefixes()...)
		}
		b, err := json.Marshal(ips)
		if err != nil {
			panic(err) // addresses and names always marshal
		}
		caps := tailcfg.NodeCapMap{}
		for k, v := range mr.Node.CapMap {
			caps[k] = v
		}
		caps[tailcfg.NodeAttrServiceHost] = []tailcfg.RawMessage{tailcfg.RawMessage(b)}
		mr.Node.CapMap = caps
		for name, rules := range mr.PacketFilters {
			mr.PacketFilters[name] = restrictServicePorts(rules, self, hosted)
		}
	}
	routes := plan.peerRoutes(self.ID)
	for _, p := range mr.Peers {
		if vips := routes[p.ID]; len(vips) > 0 {
			p.AllowedIPs = slices.Concat(p.AllowedIPs, vips)
		}
	}
	if mr.DNSConfig == nil {
		mr.DNSConfig = &tailcfg.DNSConfig{}
	}
	for _, s := range plan.services {
		short := s.Name.WithoutPrefix()
		fqdn := short + "." + magicDNSSuffix
		// tsnet's dialer keeps one address per ExtraRecords name, the
		// last one listed: IPv6 first so that dialing "tcp" gets IPv4,
		// like a node name. The quad-100 resolver answers with both.
		mr.DNSConfig.ExtraRecords = append(mr.DNSConfig.ExtraRecords,
			tailcfg.DNSRecord{Name: fqdn, Value: s.Addrs[1].String()},
			tailcfg.DNSRecord{Name: fqdn, Value: s.Addrs[0].String()},
			// tsnet resolves short names of nodes; this makes
			// Dial("NAME:port") reach the Service as well (a node
			// called NAME still wins).
			tailcfg.DNSRecord{Name: short, Value: s.Addrs[0].String()},
		)
	}
}

// restrictServicePorts narrows a host's filter for Services defined with
// ports. The lab's rules name their destination as "*" (every address of
// the node, which includes hosted VIPs); for such a Service that becomes
// the node's own addresses with the rule's ports, plus the VIPs with only
// the Service's ports among them.
func restrictServicePorts(rules []tailcfg.FilterRule, self *tailcfg.Node, hosted []*labService) []tailcfg.FilterRule {
	if !slices.ContainsFunc(hosted, func(s *labService) bool { return len(s.Ports) > 0 }) {
		return rules
	}
	out := make([]tailcfg.FilterRule, 0, len(rules))
	for _, r := range rules {
		if !slices.ContainsFunc(r.DstPorts, func(d tailcfg.NetPortRange) bool { return d.IP == "*" }) {
			out = append(out, r)
			continue
		}
		var dsts []tailcfg.NetPortRange
		for _, d := range r.DstPorts {
			if d.IP != "*" {
				dsts = append(dsts, d)
				continue
			}
			for _, a := range self.Addresses {
				dsts = append(dsts, tailcfg.NetPortRange{IP: a.Addr().String(), Ports: d.Ports})
			}
			for _, s := range hosted {
				for _, vip := range s.Addrs {
					if len(s.Ports) == 0 {
						dsts = append(dsts, tailcfg.NetPortRange{IP: vip.String(), Ports: d.Ports})
						continue
					}
					for _, p := range s.Ports {
						if d.Ports.Contains(p) {
							dsts = append(dsts, tailcfg.NetPortRange{IP: vip.String(), Ports: tailcfg.PortRange{First: p, Last: p}})
						}
					}
				}
			}
		}
		r.DstPorts = dsts
		out = append(out, r)
	}
	return out
}

// serviceInfo is the admin API's view of a Service.
type serviceInfo struct {
	Name      string      `json:"name"`      // "svc:db"
	DNSName   string      `json:"dns_name"`  // "db.tail-lab.ts.net"
	Addresses []string    `json:"addresses"` // IPv4 VIP, IPv6 VIP
	Ports     []uint16    `json:"ports"`     // open TCP ports; [] = all
	Hosts     []nodeRef   `json:"hosts"`     // clients are routed to these
	Routes    []routeInfo `json:"routes"`    // one per online client
}

type nodeRef struct {
	ID       tailcfg.NodeID       `json:"id"`
	StableID tailcfg.StableNodeID `json:"stable_id"`
	Name     string               `json:"name"` // MagicDNS name
	Hostname string               `json:"hostname"`
}

type routeInfo struct {
	Client nodeRef `json:"client"`
	Host   nodeRef `json:"host"`
}

func (p *servicePlan) ref(id tailcfg.NodeID) nodeRef {
	n := p.nodes[id]
	if n == nil {
		return nodeRef{ID: id}
	}
	return nodeRef{ID: id, StableID: n.StableID, Name: strings.TrimSuffix(n.Name, "."), Hostname: n.Hostinfo.Hostname()}
}

// serviceInfos describes the defined Services as of the last sync.
func (m *mapManager) serviceInfos() []serviceInfo {
	m.mu.Lock()
	svcs := m.servicesSortedLocked()
	plan := m.plan
	m.mu.Unlock()
	out := []serviceInfo{}
	for _, s := range svcs {
		out = append(out, describeService(s, plan))
	}
	return out
}

func describeService(s *labService, plan *servicePlan) serviceInfo {
	si := serviceInfo{
		Name:      string(s.Name),
		DNSName:   s.Name.WithoutPrefix() + "." + magicDNSSuffix,
		Addresses: []string{},
		Ports:     append([]uint16{}, s.Ports...),
		Hosts:     []nodeRef{},
		Routes:    []routeInfo{},
	}
	for _, a := range s.Addrs {
		si.Addresses = append(si.Addresses, a.String())
	}
	if plan == nil {
		return si
	}
	// A plan from before the Service was (re)defined says nothing about it.
	if !slices.ContainsFunc(plan.services, func(ps *labService) bool { return ps.Name == s.Name && slices.Equal(ps.Addrs, s.Addrs) }) {
		return si
	}
	for _, h := range plan.hosts[s.Name] {
		si.Hosts = append(si.Hosts, plan.ref(h))
	}
	route := plan.route[s.Name]
	clients := make([]tailcfg.NodeID, 0, len(route))
	for c := range route {
		clients = append(clients, c)
	}
	slices.Sort(clients)
	for _, c := range clients {
		si.Routes = append(si.Routes, routeInfo{Client: plan.ref(c), Host: plan.ref(route[c])})
	}
	return si
}

// Admin API: GET /services, GET|PUT|DELETE /services/{name}.

func (l *lab) getServices(r *http.Request) (any, error) {
	return l.mgr.serviceInfos(), nil
}

func (l *lab) getService(r *http.Request) (any, error) {
	name, err := parseServiceName(r.PathValue("name"))
	if err != nil {
		return nil, err
	}
	for _, si := range l.mgr.serviceInfos() {
		if si.Name == string(name) {
			return si, nil
		}
	}
	return nil, statusErrorf(http.StatusNotFound, "no Service %s", name)
}

// putService defines a Service (or changes its ports). The body is
// optional: {"ports": [5432]} opens only those TCP ports of its VIPs.
func (l *lab) putService(r *http.Request) (any, error) {
	name, err := parseServiceName(r.PathValue("name"))
	if err != nil {
		return nil, err
	}
	var body struct {
		Ports []uint16 `json:"ports"`
	}
	if err := decodeOptionalBody(r, &body); err != nil {
		return nil, err
	}
	if slices.Contains(body.Ports, 0) {
		return nil, errors.New("port 0 is not a port")
	}
	slices.Sort(body.Ports)
	s, err := l.mgr.putService(name, slices.Compact(body.Ports))
	if err != nil {
		return nil, err
	}
	return describeService(s, nil), nil
}

func (l *lab) deleteService(r *http.Request) (any, error) {
	name, err := parseServiceName(r.PathValue("name"))
	if err != nil {
		return nil, err
	}
	s, ok := l.mgr.deleteService(name)
	if !ok {
		return nil, statusErrorf(http.StatusNotFound, "no Service %s", name)
	}
	return describeService(s, nil), nil
}
