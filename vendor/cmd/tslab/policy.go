package main

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"tailscale.com/net/tsaddr"
	"tailscale.com/tailcfg"
	"tailscale.com/types/ipproto"
)

// Policy is a small subset of Tailscale's grants syntax: each grant lets
// the nodes selected by Src reach the nodes selected by Dst, at the
// network layer (IP) and/or with application capabilities (App).
//
// Selectors, in both Src and Dst:
//
//	"*"                    every node
//	"tag:NAME"             nodes carrying that tag
//	"autogroup:member"     untagged nodes
//	"autogroup:tagged"     tagged nodes
//	"user-1@example.net"   nodes of that user (anything containing "@")
//	"100.64.0.3", "fd7a:…", "100.64.0.0/24"
//	                       in Src: the literal IP/prefix; in Dst: the
//	                       nodes with an address in it
//	"alice", "alice.tail-lab.ts.net[.]", stable ID
//	                       the node(s) with that name or ID
//
// IP entries: "*", "PORT", "LOW-HIGH", "PROTO:PORTS" with PROTO one of
// tcp, udp, sctp, icmp (ports ignored), "*" or an IP protocol number.
//
// As in Tailscale, a grant with only App grants capabilities but lets no
// packets through; packets need an IP grant.
type Policy struct {
	Grants []Grant `json:"grants"`
}

// Grant is one entry of Policy.Grants.
type Grant struct {
	Src []string           `json:"src"`
	Dst []string           `json:"dst"`
	IP  []string           `json:"ip,omitempty"`
	App tailcfg.PeerCapMap `json:"app,omitempty"`
}

func (p *Policy) validate() error {
	for i, g := range p.Grants {
		if err := g.validate(); err != nil {
			return fmt.Errorf("grants[%d]: %w", i, err)
		}
	}
	return nil
}

func (g *Grant) validate() error {
	if len(g.Src) == 0 || len(g.Dst) == 0 {
		return errors.New("src and dst must both be non-empty")
	}
	if len(g.IP) == 0 && len(g.App) == 0 {
		return errors.New("a grant needs ip and/or app")
	}
	for _, s := range slices.Concat(g.Src, g.Dst) {
		if err := validateSelector(s); err != nil {
			return err
		}
	}
	for _, s := range g.IP {
		if _, _, err := parseIPSpec(s); err != nil {
			return err
		}
	}
	for c := range g.App {
		if c == "" {
			return errors.New("empty app capability name")
		}
	}
	return nil
}

func validateSelector(s string) error {
	switch {
	case s == "":
		return errors.New("empty selector")
	case strings.HasPrefix(s, "tag:") && len(s) == len("tag:"):
		return fmt.Errorf("selector %q: empty tag name", s)
	case strings.HasPrefix(s, "autogroup:") && s != "autogroup:member" && s != "autogroup:tagged":
		return fmt.Errorf("selector %q: only autogroup:member and autogroup:tagged are supported", s)
	case strings.Contains(s, "/"):
		if _, err := netip.ParsePrefix(s); err != nil {
			return fmt.Errorf("selector %q: %w", s, err)
		}
	}
	return nil
}

// protoNames maps the protocol names accepted in IP specs to IP protocol
// numbers. ICMP covers both address families, since a rule applies to
// all of a node's addresses.
var protoNames = map[string][]int{
	"tcp":  {int(ipproto.TCP)},
	"udp":  {int(ipproto.UDP)},
	"sctp": {int(ipproto.SCTP)},
	"icmp": {int(ipproto.ICMPv4), int(ipproto.ICMPv6)},
}

// parseIPSpec parses one Grant.IP entry into IP protocols (nil meaning
// Tailscale's default of TCP, UDP and ICMP) and a port range.
func parseIPSpec(s string) (protos []int, ports tailcfg.PortRange, err error) {
	bad := func(why string) error { return fmt.Errorf("ip %q: %s", s, why) }
	protoStr, portStr, hasProto := strings.Cut(s, ":")
	if !hasProto {
		portStr = protoStr
	} else {
		switch {
		case protoStr == "*":
		case protoNames[protoStr] != nil:
			protos = protoNames[protoStr]
		default:
			n, err := strconv.ParseUint(protoStr, 10, 8)
			if err != nil {
				return nil, ports, bad("unknown protocol " + strconv.Quote(protoStr))
			}
			protos = []int{int(n)}
		}
	}
	if portStr == "*" || (hasProto && protoStr == "icmp") {
		return protos, tailcfg.PortRangeAny, nil
	}
	lo, hi, isRange := strings.Cut(portStr, "-")
	first, err1 := strconv.ParseUint(lo, 10, 16)
	last := first
	var err2 error
	if isRange {
		last, err2 = strconv.ParseUint(hi, 10, 16)
	}
	if err1 != nil || err2 != nil || first > last {
		return nil, ports, bad("want *, PORT or LOW-HIGH ports")
	}
	return protos, tailcfg.PortRange{First: uint16(first), Last: uint16(last)}, nil
}

// policyEnv resolves selectors against one snapshot of the tailnet.
type policyEnv struct {
	nodes []*tailcfg.Node // removed nodes excluded
	users map[tailcfg.UserID]string
}

func (e *policyEnv) selects(sel string, n *tailcfg.Node) bool {
	switch {
	case sel == "*":
		return true
	case strings.HasPrefix(sel, "tag:"):
		return slices.Contains(n.Tags, sel)
	case sel == "autogroup:member":
		return len(n.Tags) == 0
	case sel == "autogroup:tagged":
		return len(n.Tags) > 0
	case strings.Contains(sel, "@"):
		return strings.EqualFold(e.users[n.User], sel)
	}
	if pfx, err := netip.ParsePrefix(sel); err == nil {
		return slices.ContainsFunc(n.Addresses, func(p netip.Prefix) bool { return pfx.Contains(p.Addr()) })
	}
	return matchNodeSelector(n, sel)
}

func (e *policyEnv) selectsAny(sels []string, n *tailcfg.Node) bool {
	return slices.ContainsFunc(sels, func(s string) bool { return e.selects(s, n) })
}

// srcIPs turns Src selectors into FilterRule.SrcIPs. IP literals pass
// through unchanged, like Tailscale does, so they work even for an
// address no current node has.
func (e *policyEnv) srcIPs(sels []string) []string {
	if slices.Contains(sels, "*") {
		return []string{"*"}
	}
	var out []string
	for _, s := range sels {
		if _, err := netip.ParseAddr(s); err == nil {
			out = append(out, s)
			continue
		}
		if _, err := netip.ParsePrefix(s); err == nil {
			out = append(out, s)
			continue
		}
		for _, n := range e.nodes {
			if e.selects(s, n) {
				for _, p := range n.Addresses {
					out = append(out, p.Addr().String())
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// packetFilter compiles p into the packet filter for destination node
// dst: Tailscale filters are enforced by the receiving node, so only
// grants whose Dst selects dst matter here. The result is never nil; an
// empty filter means "deny everything".
func (e *policyEnv) packetFilter(p *Policy, dst *tailcfg.Node) []tailcfg.FilterRule {
	rules := []tailcfg.FilterRule{}
	for _, g := range p.Grants {
		if !e.selectsAny(g.Dst, dst) {
			continue
		}
		srcs := e.srcIPs(g.Src)
		if len(srcs) == 0 {
			continue // no current node matches; a later tick may differ
		}
		rules = append(rules, ipRules(srcs, g.IP)...)
		if len(g.App) > 0 {
			rules = append(rules, tailcfg.FilterRule{
				SrcIPs: srcs,
				CapGrant: []tailcfg.CapGrant{{
					Dsts:   slices.Clone(dst.Addresses),
					CapMap: g.App,
				}},
			})
		}
	}
	return rules
}

// ipRules builds the network-layer rules for one grant. A FilterRule has
// a single protocol list, so specs are grouped by protocol, keeping
// their order for readable filters.
func ipRules(srcs, specs []string) []tailcfg.FilterRule {
	type group struct {
		protos []int
		ports  []tailcfg.NetPortRange
	}
	var groups []*group
	for _, s := range specs {
		protos, ports, err := parseIPSpec(s)
		if err != nil {
			continue // validated on PUT
		}
		i := slices.IndexFunc(groups, func(g *group) bool { return slices.Equal(g.protos, protos) })
		if i < 0 {
			groups = append(groups, &group{protos: protos})
			i = len(groups) - 1
		}
		groups[i].ports = append(groups[i].ports, tailcfg.NetPortRange{IP: "*", Ports: ports})
	}
	var out []tailcfg.FilterRule
	for _, g := range groups {
		out = append(out, tailcfg.FilterRule{SrcIPs: srcs, DstPorts: g.ports, IPProto: g.protos})
	}
	return out
}

// globalCapsRule is what testcontrol's SetGlobalAppCaps adds to every
// node's filter: the capabilities, from every source, to every address.
func globalCapsRule(caps tailcfg.PeerCapMap) tailcfg.FilterRule {
	return tailcfg.FilterRule{
		SrcIPs: []string{"*"},
		CapGrant: []tailcfg.CapGrant{{
			Dsts:   []netip.Prefix{tsaddr.AllIPv4(), tsaddr.AllIPv6()},
			CapMap: caps,
		}},
	}
}
