package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"time"

	"tailscale.com/ipn/ipnext"
	"tailscale.com/ipn/ipnlocal"
	"tailscale.com/tailcfg"
	"tailscale.com/tsd"
	"tailscale.com/types/logger"
)

// WhoIs in process, without the LocalAPI.
//
// tsnet only offers WhoIs through its LocalAPI client: an HTTP request over
// an in-memory pipe, answered with indented JSON of a deep copy of the
// peer's node, decoded again on our side. Per connection that cost about
// as much CPU as our whole TLS handshake with the client (profiled with
// bench/run --perf). The LocalAPI handler itself is two calls on the
// node's LocalBackend; this makes the same two calls directly.
//
// tsnet does not expose its LocalBackend, but every LocalBackend
// instantiates the registered ipn extensions and passes itself to them.
// The registration below never creates an extension: it records which
// LocalBackend belongs to which tsd.System (tsnet.Server.Sys() is the key)
// and declines.
var backends sync.Map // *tsd.System -> *ipnlocal.LocalBackend

func init() {
	ipnext.RegisterExtension("tailgres-backend", func(_ logger.Logf, sb ipnext.SafeBackend) (ipnext.Extension, error) {
		if lb, ok := sb.(*ipnlocal.LocalBackend); ok {
			backends.Store(sb.Sys(), lb)
		}
		return nil, ipnext.SkipExtension
	})
}

// backend returns the node's LocalBackend; the node must be started.
func (n *node) backend() (*ipnlocal.LocalBackend, error) {
	if _, err := n.client(); err != nil {
		return nil, err
	}
	v, ok := backends.Load(n.srv.Sys())
	if !ok {
		// Only a tailscale.com upgrade that changed how LocalBackend meets
		// its extensions gets here; every WhoIs test would fail.
		return nil, errors.New("in-process WhoIs unavailable: this node's LocalBackend was not registered")
	}
	return v.(*ipnlocal.LocalBackend), nil
}

// forgetBackend drops the registration of a closed node.
func forgetBackend(sys *tsd.System) { backends.Delete(sys) }

// errNoNode: no tailnet node has the address (the peer is unknown, which is
// not a failure of this node; tsffi_whois returns 1 for it).
var errNoNode = errors.New("no tailnet node has this address")

type identityJSON struct {
	StableID        string                       `json:"stable_id"`
	NodeName        string                       `json:"node_name"`
	UserLogin       string                       `json:"user_login"`
	UserDisplayName string                       `json:"user_display_name"`
	Tags            []string                     `json:"tags"`
	Addresses       []string                     `json:"addresses"`
	OS              string                       `json:"os"`
	SharedIn        bool                         `json:"shared_in"`
	KeyExpiry       *time.Time                   `json:"key_expiry"`
	Expired         bool                         `json:"expired"`
	CapMap          map[string][]json.RawMessage `json:"cap_map"`
}

// addrPortOf is the address the C side passes: 16 bytes (IPv4 mapped into
// IPv6, as ::ffff:a.b.c.d) and a port.
func addrPortOf(ip [16]byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ip).Unmap(), port)
}

// announcement is what a listener sends the C side for one connection:
// the id (8 bytes little-endian), the peer's IP (16 bytes, IPv4 mapped)
// and port (2 bytes big-endian): TSFFI_ANNOUNCE_LEN bytes.
func announcement(id uint64, peer netip.AddrPort) []byte {
	msg := binary.LittleEndian.AppendUint64(make([]byte, 0, 26), id)
	ip := peer.Addr().As16()
	msg = append(msg, ip[:]...)
	return binary.BigEndian.AppendUint16(msg, peer.Port())
}

// whois identifies the peer at ipp exactly as the LocalAPI's /whois does:
// the node owning the address (or, for a proxied flow, the one the proxy
// map names), its user's profile, and the capabilities granted to the
// node's first address toward this node.
func (n *node) whois(ipp netip.AddrPort) ([]byte, error) {
	lb, err := n.backend()
	if err != nil {
		return nil, err
	}
	nd, up, ok := lb.WhoIs("tcp", ipp)
	if !ok {
		return nil, errNoNode
	}
	var caps tailcfg.PeerCapMap
	if nd.Addresses().Len() > 0 {
		caps = lb.PeerCaps(nd.Addresses().At(0).Addr())
	}
	return identityOf(nd, up, caps)
}

func identityOf(nd tailcfg.NodeView, up tailcfg.UserProfile, caps tailcfg.PeerCapMap) ([]byte, error) {
	expiry := nd.KeyExpiry()
	out := identityJSON{
		StableID:        string(nd.StableID()),
		NodeName:        strings.TrimSuffix(nd.Name(), "."),
		UserLogin:       up.LoginName,
		UserDisplayName: up.DisplayName,
		Tags:            nonNil(nd.Tags().AsSlice()),
		Addresses:       make([]string, 0, nd.Addresses().Len()),
		Expired:         nd.Expired() || (!expiry.IsZero() && expiry.Before(time.Now())),
		CapMap:          make(map[string][]json.RawMessage, len(caps)),
	}
	if !expiry.IsZero() {
		t := expiry.UTC()
		out.KeyExpiry = &t
	}
	for _, p := range nd.Addresses().All() {
		out.Addresses = append(out.Addresses, p.Addr().String())
	}
	if hi := nd.Hostinfo(); hi.Valid() {
		out.OS = hi.OS()
		out.SharedIn = hi.ShareeNode()
	}
	for name, vals := range caps {
		raw := make([]json.RawMessage, 0, len(vals))
		for _, v := range vals {
			raw = append(raw, json.RawMessage(v))
		}
		out.CapMap[string(name)] = raw
	}
	return json.Marshal(out)
}
