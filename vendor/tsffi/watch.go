package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
)

type peerJSON struct {
	NodeID    int64    `json:"node_id"` // what "removed" names
	StableID  string   `json:"stable_id"`
	NodeName  string   `json:"node_name"`
	Addresses []string `json:"addresses"`
	Tags      []string `json:"tags"`
	UserID    int64    `json:"user_id"`
	Expired   bool     `json:"expired"`
}

type netmapJSON struct {
	Seq     uint64     `json:"seq"`
	Kind    string     `json:"kind"`
	Peers   []peerJSON `json:"peers"`
	Removed []int64    `json:"removed"`
}

// watch streams one JSON line per change to the returned fd: the initial
// network map, peers added, changed (tags, capabilities on the node, key
// expiry) or removed, and our own node changing. Grants travel in the
// packet filter, whose changes the IPN bus does not announce on Linux:
// consumers that care about grants also re-check (whois) periodically.
func (n *node) watch() (int, error) {
	lc, err := n.client()
	if err != nil {
		return -1, err
	}
	mask := ipn.NotifyInitialNetMap | ipn.NotifyPeerChanges
	w, err := lc.WatchIPNBus(n.ctx, mask)
	if err != nil {
		return -1, fmt.Errorf("watching the tailnet: %w", err)
	}
	goEnd, cEnd, err := socketpair(syscall.SOCK_STREAM)
	if err != nil {
		w.Close()
		return -1, err
	}
	out, err := fileConn(goEnd)
	if err != nil {
		w.Close()
		syscall.Close(cEnd)
		return -1, err
	}
	var mu sync.Mutex
	var seq uint64
	emit := func(ev netmapJSON) bool {
		mu.Lock()
		defer mu.Unlock()
		seq++
		ev.Seq = seq
		if ev.Peers == nil {
			ev.Peers = []peerJSON{}
		}
		if ev.Removed == nil {
			ev.Removed = []int64{}
		}
		line, _ := json.Marshal(ev)
		_, err := out.Write(append(line, '\n'))
		return err == nil
	}
	stop := func() {
		w.Close()
		out.Close()
	}
	go func() {
		// The reader closing its end ends the watch.
		buf := make([]byte, 1)
		out.Read(buf)
		stop()
	}()
	go func() {
		defer stop()
		for {
			note, err := w.Next()
			if err != nil {
				return
			}
			var ev netmapJSON
			switch {
			case note.NetMap != nil:
				ev.Kind = "netmap"
				for _, p := range note.NetMap.Peers {
					ev.Peers = append(ev.Peers, peerFromView(p))
				}
			case len(note.PeersChanged) > 0:
				ev.Kind = "peers_changed"
				for _, p := range note.PeersChanged {
					ev.Peers = append(ev.Peers, peerFromView(p.View()))
				}
			case len(note.PeersRemoved) > 0:
				ev.Kind = "peers_removed"
				for _, id := range note.PeersRemoved {
					ev.Removed = append(ev.Removed, int64(id))
				}
			case note.SelfChange != nil:
				ev.Kind = "self_changed"
			default:
				continue
			}
			if !emit(ev) {
				return
			}
		}
	}()
	return cEnd, nil
}

func peerFromView(p tailcfg.NodeView) peerJSON {
	pj := peerJSON{
		NodeID:    int64(p.ID()),
		StableID:  string(p.StableID()),
		NodeName:  strings.TrimSuffix(p.Name(), "."),
		Tags:      p.Tags().AsSlice(),
		Addresses: []string{},
		UserID:    int64(p.User()),
		Expired:   p.Expired() || (!p.KeyExpiry().IsZero() && p.KeyExpiry().Before(time.Now())),
	}
	if pj.Tags == nil {
		pj.Tags = []string{}
	}
	for _, a := range p.Addresses().All() {
		pj.Addresses = append(pj.Addresses, a.Addr().String())
	}
	return pj
}
