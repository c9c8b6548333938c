package main

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"

	"tailscale.com/ipn"
)

type peerJSON struct {
	StableID  string   `json:"stable_id"`
	NodeName  string   `json:"node_name"`
	Addresses []string `json:"addresses"`
	Tags      []string `json:"tags"`
	UserID    int64    `json:"user_id"`
	Expired   bool     `json:"expired"`
}

type netmapJSON struct {
	Seq   uint64     `json:"seq"`
	Peers []peerJSON `json:"peers"`
}

// watch streams one JSON line per network-map change to the returned fd.
// Grants live in the packet filter, which changes the netmap too, so every
// grant change also produces a line; consumers re-check with whois.
func (n *node) watch() (int, error) {
	lc, err := n.client()
	if err != nil {
		return -1, err
	}
	w, err := lc.WatchIPNBus(n.ctx, ipn.NotifyInitialNetMap|ipn.NotifyNoPrivateKeys)
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
	go func() {
		// The reader closing its end ends the watch.
		buf := make([]byte, 1)
		out.Read(buf)
		w.Close()
	}()
	go func() {
		defer out.Close()
		defer w.Close()
		var seq uint64
		for {
			note, err := w.Next()
			if err != nil {
				return
			}
			nm := note.NetMap
			if nm == nil {
				continue
			}
			seq++
			ev := netmapJSON{Seq: seq, Peers: []peerJSON{}}
			now := time.Now()
			for _, p := range nm.Peers {
				pj := peerJSON{
					StableID:  string(p.StableID()),
					NodeName:  strings.TrimSuffix(p.Name(), "."),
					Tags:      p.Tags().AsSlice(),
					Addresses: []string{},
					UserID:    int64(p.User()),
					Expired:   p.Expired() || (!p.KeyExpiry().IsZero() && p.KeyExpiry().Before(now)),
				}
				if pj.Tags == nil {
					pj.Tags = []string{}
				}
				for _, a := range p.Addresses().All() {
					pj.Addresses = append(pj.Addresses, a.Addr().String())
				}
				ev.Peers = append(ev.Peers, pj)
			}
			line, _ := json.Marshal(ev)
			line = append(line, '\n')
			if _, err := out.Write(line); err != nil {
				return // reader gone
			}
		}
	}()
	var _ net.Conn = out
	return cEnd, nil
}
