package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"tailscale.com/tailcfg"
)

// maxBody bounds admin request bodies; policies are small.
const maxBody = 1 << 20

func (l *lab) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /nodes", l.handle(l.getNodes))
	mux.HandleFunc("GET /nodes/{sel}", l.handle(l.getNode))
	mux.HandleFunc("DELETE /nodes/{sel}", l.handle(l.deleteNode))
	mux.HandleFunc("POST /nodes/{sel}/tags", l.handle(l.setTags))
	mux.HandleFunc("POST /nodes/{sel}/expire", l.handle(l.expireNode))
	mux.HandleFunc("GET /caps/global", l.handle(l.getGlobalCaps))
	mux.HandleFunc("POST /caps/global", l.handle(l.setGlobalCaps))
	mux.HandleFunc("GET /policy", l.handle(l.getPolicy))
	mux.HandleFunc("PUT /policy", l.handle(l.putPolicy))
	mux.HandleFunc("DELETE /policy", l.handle(l.deletePolicy))
	mux.HandleFunc("GET /services", l.handle(l.getServices))
	mux.HandleFunc("GET /services/{name}", l.handle(l.getService))
	mux.HandleFunc("PUT /services/{name}", l.handle(l.putService))
	mux.HandleFunc("DELETE /services/{name}", l.handle(l.deleteService))
	mux.HandleFunc("POST /auth/complete", l.handle(l.completeAuth))
	mux.HandleFunc("GET /control", l.handle(l.getControl))
	mux.HandleFunc("POST /control/down", l.handle(l.setControl(false)))
	mux.HandleFunc("POST /control/up", l.handle(l.setControl(true)))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path)})
	})
	return mux
}

// completeAuth plays the person who opens a node's interactive login URL
// (control started with --require-login).
func (l *lab) completeAuth(r *http.Request) (any, error) {
	var body struct {
		URL string `json:"url"`
	}
	if err := decodeBody(r, &body); err != nil {
		return nil, err
	}
	if body.URL == "" || !l.ctrl.CompleteAuth(body.URL) {
		return nil, &errStatus{code: http.StatusNotFound, msg: fmt.Sprintf("no pending login at %q", body.URL)}
	}
	return map[string]bool{"completed": true}, nil
}

// handle adapts a handler that returns (response, error) to the admin
// API's conventions: JSON bodies, and {"error": "..."} with a 4xx status
// on failure.
func (l *lab) handle(f func(*http.Request) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		res, err := f(r)
		if err != nil {
			code := http.StatusBadRequest
			var es *errStatus
			if errors.As(err, &es) {
				code = es.code
			}
			l.logf("admin: %s %s: %v", r.Method, r.URL.Path, err)
			writeJSON(w, code, map[string]string{"error": err.Error()})
			return
		}
		l.logf("admin: %s %s: ok", r.Method, r.URL.Path)
		writeJSON(w, http.StatusOK, res)
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		code = http.StatusInternalServerError
		b, _ = json.Marshal(map[string]string{"error": err.Error()})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(append(b, '\n'))
}

// decodeBody decodes a JSON body strictly: unknown fields are errors, so
// a typo in a policy fails loudly instead of silently allowing nothing.
func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad JSON body: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("bad JSON body: trailing data")
	}
	return nil
}

// decodeOptionalBody is decodeBody for requests whose body may be empty
// (v is then left as it is).
func decodeOptionalBody(r *http.Request, v any) error {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return fmt.Errorf("reading body: %w", err)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	return decodeBody(r, v)
}

func (l *lab) getNodes(r *http.Request) (any, error) {
	return l.nodeInfos(l.snapshot()), nil
}

func (l *lab) getNode(r *http.Request) (any, error) {
	n, err := l.findNode(r.PathValue("sel"))
	if err != nil {
		return nil, err
	}
	return l.nodeInfos([]*tailcfg.Node{n})[0], nil
}

func (l *lab) setTags(r *http.Request) (any, error) {
	var body struct {
		Tags []string `json:"tags"`
	}
	if err := decodeBody(r, &body); err != nil {
		return nil, err
	}
	for _, t := range body.Tags {
		if !strings.HasPrefix(t, "tag:") || len(t) == len("tag:") {
			return nil, fmt.Errorf("invalid tag %q: want tag:NAME", t)
		}
	}
	return l.updateNode(r.PathValue("sel"), func(n *tailcfg.Node) {
		n.Tags = append([]string{}, body.Tags...)
	})
}

// expireNode sets the node's key expiry in the past. Peers only notice
// in managed netmaps (see mapManager.takeOver), so this turns policy
// mode on.
func (l *lab) expireNode(r *http.Request) (any, error) {
	l.mgr.takeOver()
	return l.updateNode(r.PathValue("sel"), func(n *tailcfg.Node) {
		n.KeyExpiry = time.Now().Add(-time.Minute)
	})
}

// updateNode applies mutate to a copy of the node and stores it with
// testcontrol's UpdateNode, which wakes every node's map poll.
//
// UpdateNode replaces the whole node, so an endpoint or Hostinfo update
// that lands between our read and write is lost until the node's next
// update. That window is tiny and harmless in the lab.
func (l *lab) updateNode(sel string, mutate func(*tailcfg.Node)) (any, error) {
	n, err := l.findNode(sel)
	if err != nil {
		return nil, err
	}
	cur := l.ctrl.Node(n.Key)
	if cur == nil {
		return nil, statusErrorf(http.StatusNotFound, "node %s vanished", n.StableID)
	}
	mutate(cur)
	l.ctrl.UpdateNode(cur)
	l.mgr.kickNow()
	return l.nodeInfos([]*tailcfg.Node{cur})[0], nil
}

func (l *lab) deleteNode(r *http.Request) (any, error) {
	n, err := l.findNode(r.PathValue("sel"))
	if err != nil {
		return nil, err
	}
	l.mgr.remove(n.StableID)
	return l.nodeInfos([]*tailcfg.Node{n})[0], nil
}

func (l *lab) getGlobalCaps(r *http.Request) (any, error) {
	caps := l.mgr.globalCapsCopy()
	if caps == nil {
		caps = tailcfg.PeerCapMap{}
	}
	return caps, nil
}

// setGlobalCaps replaces the global app capabilities (a grant from every
// source to every node); an empty object clears them.
func (l *lab) setGlobalCaps(r *http.Request) (any, error) {
	var caps tailcfg.PeerCapMap
	if err := decodeBody(r, &caps); err != nil {
		return nil, err
	}
	l.mgr.setGlobalCaps(caps)
	return l.getGlobalCaps(r)
}

// getPolicy returns the installed policy, or null in testcontrol's
// default allow-all mode.
func (l *lab) getPolicy(r *http.Request) (any, error) {
	return l.mgr.currentPolicy(), nil
}

func (l *lab) putPolicy(r *http.Request) (any, error) {
	var p Policy
	if err := decodeBody(r, &p); err != nil {
		return nil, err
	}
	if err := p.validate(); err != nil {
		return nil, err
	}
	l.mgr.setPolicy(&p)
	return &p, nil
}

func (l *lab) deletePolicy(r *http.Request) (any, error) {
	l.mgr.setPolicy(nil)
	return map[string]any{}, nil
}
