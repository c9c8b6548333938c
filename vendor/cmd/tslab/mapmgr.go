package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"maps"
	"slices"
	"sync"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/util/set"
)

const (
	// syncInterval is how often managed nodes' netmaps are recomputed.
	// Node endpoint and DERP changes only reach managed nodes this way,
	// so it also bounds how stale peer endpoints can get.
	syncInterval = 200 * time.Millisecond

	// streamSettle is how long after a map poll starts we keep
	// re-sending the node's netmap even if unchanged. A raw response
	// queued just before a reconnecting poll registers can be consumed
	// by the dying one; re-sending for a short while makes sure the new
	// poll gets a netmap.
	streamSettle = 500 * time.Millisecond
)

// mapManager implements "policy mode": testcontrol has no policy engine
// and puts an allow-all PacketFilter in every automatic MapResponse, so
// to enforce a policy (or hide a removed node) the lab computes each
// node's netmap itself and delivers it with AddRawMapResponse.
//
// Policy mode is on while a policy is installed or a Service is defined
// (services.go: routes to a Service differ per node), and for good once a
// node has been removed or expired (see takeOver).
//
// AddRawMapResponse permanently suppresses testcontrol's automatic
// responses for that node, so once the manager has sent a node a netmap
// it keeps doing so for the life of the control server, even after the
// policy is deleted (it then sends testcontrol's allow-all filter).
// Nodes that join later get testcontrol's automatic first netmap and are
// taken over on the next sync.
type mapManager struct {
	ctrl *testcontrol.Server
	logf logger.Logf
	kick chan struct{}

	mu         sync.Mutex
	policy     *Policy // nil: testcontrol's allow-all
	globalCaps tailcfg.PeerCapMap
	removed    set.Set[tailcfg.StableNodeID]
	takenOver  bool // set by remove and expire; see takeOver
	streams    map[key.NodePublic]*streamState

	// Tailscale Services (services.go).
	services map[tailcfg.ServiceName]*labService
	vipNext  int                        // VIPs handed out so far
	adverts  map[key.NodePublic]*advert // what each node advertises
	plan     *servicePlan               // the last sync's, for the admin API

	// sent is the last netmap delivered to each managed node, and assign
	// each Service's client → host assignment. Only the run goroutine
	// touches them.
	sent   map[key.NodePublic]sentMap
	assign map[tailcfg.ServiceName]map[tailcfg.NodeID]tailcfg.NodeID
	// approved: the Services each node has hosted, which it keeps the host
	// capability for after it stops advertising them (see services.go).
	approved map[tailcfg.StableNodeID]set.Set[tailcfg.ServiceName]
}

type streamState struct {
	live  int       // streaming map polls in flight
	start time.Time // start of the newest one
}

type sentMap struct {
	json    []byte
	at      time.Time
	hosting []tailcfg.ServiceName // Services it got the host capability for
}

func newMapManager(ctrl *testcontrol.Server, logf logger.Logf) *mapManager {
	return &mapManager{
		ctrl:    ctrl,
		logf:    logf,
		kick:    make(chan struct{}, 1),
		removed: set.Set[tailcfg.StableNodeID]{},
		streams: map[key.NodePublic]*streamState{},
		sent:    map[key.NodePublic]sentMap{},
	}
}

// noteMapRequest is installed as testcontrol's HoldMapRequest hook. It
// tracks which nodes have a streaming poll, because raw responses can
// only be delivered to those, because a fresh poll of a managed node gets
// nothing from testcontrol until we send it a netmap, and because a
// Service host is one whose poll is connected: when a poll ends (the node
// stopped, was killed, or lost control), the next sync knows at once.
func (m *mapManager) noteMapRequest(req *tailcfg.MapRequest) (done func()) {
	if req.ReadOnly {
		return nil
	}
	if !req.Stream {
		if req.Hostinfo == nil {
			return nil
		}
		// A Hostinfo update, maybe a new Hostinfo.ServicesHash (a
		// Service advertised or withdrawn). testcontrol has stored it
		// by the time done runs.
		return m.kickNow
	}
	m.mu.Lock()
	st := m.streams[req.NodeKey]
	if st == nil {
		st = &streamState{}
		m.streams[req.NodeKey] = st
	}
	st.live++
	st.start = time.Now()
	m.mu.Unlock()
	// The poll registers with testcontrol only after this hook returns.
	time.AfterFunc(50*time.Millisecond, m.kickNow)
	return func() {
		m.mu.Lock()
		st.live--
		m.mu.Unlock()
		m.kickNow()
	}
}

func (m *mapManager) kickNow() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

func (m *mapManager) setPolicy(p *Policy) {
	m.mu.Lock()
	m.policy = p
	m.mu.Unlock()
	m.kickNow()
}

func (m *mapManager) currentPolicy() *Policy {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.policy
}

func (m *mapManager) setGlobalCaps(caps tailcfg.PeerCapMap) {
	if len(caps) == 0 {
		caps = nil
	}
	m.mu.Lock()
	m.globalCaps = caps
	m.mu.Unlock()
	// Unmanaged nodes get the caps from testcontrol's automatic
	// responses, managed ones from sync.
	m.ctrl.SetGlobalAppCaps(caps)
	m.kickNow()
}

func (m *mapManager) globalCapsCopy() tailcfg.PeerCapMap {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.globalCaps)
}

// remove hides the node from every other node's netmap and empties its
// own. testcontrol cannot delete nodes, so this needs policy mode.
func (m *mapManager) remove(id tailcfg.StableNodeID) {
	m.mu.Lock()
	m.removed.Add(id)
	m.takenOver = true
	m.mu.Unlock()
	m.kickNow()
}

// takeOver switches on policy mode (with testcontrol's allow-all filter
// unless a policy is set) for good.
//
// Expiry needs this: testcontrol stamps every MapResponse with a fixed
// ControlTime in 2020, and clients that believe control's clock is
// that far behind never flag peers as expired. Managed netmaps carry the
// real time.
func (m *mapManager) takeOver() {
	m.mu.Lock()
	m.takenOver = true
	m.mu.Unlock()
	m.kickNow()
}

func (m *mapManager) isRemoved(id tailcfg.StableNodeID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.removed.Contains(id)
}

func (m *mapManager) run(ctx context.Context) {
	t := time.NewTicker(syncInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.kick:
		}
		m.sync()
	}
}

// syncSnapshot is the manager state one sync works from.
type syncSnapshot struct {
	policy   *Policy
	caps     tailcfg.PeerCapMap
	removed  set.Set[tailcfg.StableNodeID]
	active   bool // policy mode
	streams  map[key.NodePublic]streamState
	services []*labService // by name
}

func (m *mapManager) snapshot() syncSnapshot {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := syncSnapshot{
		policy:   m.policy,
		caps:     m.globalCaps,
		removed:  m.removed.Clone(),
		active:   m.policy != nil || m.takenOver || len(m.services) > 0,
		streams:  make(map[key.NodePublic]streamState, len(m.streams)),
		services: m.servicesSortedLocked(),
	}
	for k, st := range m.streams {
		s.streams[k] = *st
	}
	return s
}

// sync recomputes and, where changed, delivers every managed node's
// netmap. Selectors are resolved afresh each time, so nodes that join
// or get retagged are picked up on the next tick.
func (m *mapManager) sync() {
	snap := m.snapshot()
	if !snap.active && len(m.sent) == 0 {
		return // pure testcontrol defaults
	}
	nodes := m.ctrl.AllNodes()
	env := &policyEnv{users: userLogins(m.ctrl, nodes)}
	for _, n := range nodes {
		if !snap.removed.Contains(n.StableID) {
			env.nodes = append(env.nodes, n)
		}
	}
	plan := m.planServices(snap, nodes)
	m.mu.Lock()
	m.plan = plan
	m.mu.Unlock()
	newHost := false
	for _, n := range nodes {
		last, managed := m.sent[n.Key]
		if !snap.active && !managed {
			continue
		}
		st := snap.streams[n.Key]
		if st.live == 0 {
			continue // resent when it polls again
		}
		mr, err := m.ctrl.MapResponse(&tailcfg.MapRequest{NodeKey: n.Key})
		if err != nil || mr == nil {
			continue
		}
		rewriteMapResponse(mr, n, nodes, env, snap, plan)
		// Compare without ControlTime, which is set to the real time
		// (see takeOver) only when the netmap is actually sent, and
		// without a c2n request (PingRequest) MapResponse took off the
		// node's queue: that must reach the node either way.
		mr.ControlTime = nil
		ping := mr.PingRequest
		mr.PingRequest = nil
		b, err := json.Marshal(mr)
		if err != nil {
			m.logf("policy: marshal netmap for %s: %v", n.Name, err)
			requeuePing(m.ctrl, n.Key, ping)
			continue
		}
		if managed && bytes.Equal(last.json, b) && last.at.After(st.start.Add(streamSettle)) {
			requeuePing(m.ctrl, n.Key, ping)
			continue
		}
		mr.ControlTime = new(time.Now().UTC())
		mr.PingRequest = ping
		// False means no poll is registered yet; retry next tick. (A
		// c2n request goes with it; its sender times out and retries.)
		if !m.ctrl.AddRawMapResponse(n.Key, mr) {
			continue
		}
		if !managed {
			m.logf("policy: now managing netmaps of %s", n.Name)
		}
		m.logf("policy: sent netmap to %s: %d peers, %d filter rules", n.Name, len(mr.Peers), len(mr.PacketFilters["base"]))
		var hosting []tailcfg.ServiceName
		for _, s := range plan.hosting[n.ID] {
			hosting = append(hosting, s.Name)
		}
		for _, s := range hosting {
			if !slices.Contains(last.hosting, s) || last.at.Before(st.start) {
				newHost = true
			}
		}
		m.sent[n.Key] = sentMap{json: b, at: time.Now(), hosting: hosting}
	}
	if newHost {
		// Clients are routed to a host once its capability has gone
		// out (see planServices): do that now, not on the next tick.
		m.kickNow()
	}
}

// requeuePing gives a PingRequest that testcontrol's MapResponse took off
// a node's queue back to it, for delivery on its map poll.
func requeuePing(ctrl *testcontrol.Server, nk key.NodePublic, pr *tailcfg.PingRequest) {
	if pr != nil {
		ctrl.AddPingRequest(nk, pr)
	}
}

// rewriteMapResponse turns testcontrol's MapResponse for self into the
// one the lab's policy, removals and Services call for.
func rewriteMapResponse(mr *tailcfg.MapResponse, self *tailcfg.Node, all []*tailcfg.Node, env *policyEnv, snap syncSnapshot, plan *servicePlan) {
	filter := mr.PacketFilter // testcontrol's allow-all (+ global caps)
	if snap.policy != nil {
		filter = env.packetFilter(snap.policy, self)
		if snap.caps != nil {
			filter = append(filter, globalCapsRule(snap.caps))
		}
	}
	selfRemoved := snap.removed.Contains(self.StableID)
	if selfRemoved {
		filter = []tailcfg.FilterRule{}
	}
	// PacketFilter's omitempty can't express "deny all" (an empty
	// list); the named form can, and "base" is the key the client files
	// PacketFilter under, so the two forms replace each other.
	mr.PacketFilter = nil
	mr.PacketFilters = map[string][]tailcfg.FilterRule{"base": filter}

	peers := slices.DeleteFunc(mr.Peers, func(p *tailcfg.Node) bool {
		return selfRemoved || snap.removed.Contains(p.StableID)
	})
	if len(peers) > 0 {
		mr.Peers = peers
	} else {
		// An empty Peers means "unchanged" to the client, so an empty
		// peer list has to be spelled out as removals.
		mr.Peers = nil
		for _, n := range all {
			if n.ID != self.ID {
				mr.PeersRemoved = append(mr.PeersRemoved, n.ID)
			}
		}
	}

	if !selfRemoved {
		applyServices(mr, self, plan)
	}

	// testcontrol builds UserProfiles from a map; sort them so that
	// identical netmaps marshal identically and aren't resent.
	slices.SortFunc(mr.UserProfiles, func(a, b tailcfg.UserProfile) int {
		return cmp.Compare(a.ID, b.ID)
	})
}
