package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/tsnet"
	"tailscale.com/types/logger"
)

// config is the JSON document tsffi_new takes (see tsffi.h).
type config struct {
	Dir           string            `json:"dir"`
	Hostname      string            `json:"hostname"`
	AuthKey       string            `json:"auth_key"`
	ControlURL    string            `json:"control_url"`
	Ephemeral     bool              `json:"ephemeral"`
	AdvertiseTags []string          `json:"advertise_tags"`
	Log           string            `json:"log"`
	Env           map[string]string `json:"env"`
}

// node is one embedded tsnet server and the resources handed to C.
type node struct {
	srv    *tsnet.Server
	ctx    context.Context // cancelled by close: ends listeners, watches, pending calls
	cancel context.CancelFunc
	logOut io.Closer

	mu      sync.Mutex
	started bool
	closed  bool
	lc      *local.Client
	lastErr string // the backend's latest error message (bad auth key, ...)
	// services this node hosts (listenService), by name.
	services map[string]*tsnet.ServiceListener
}

// callTimeout bounds each in-process LocalAPI call so a wedged backend
// turns into an error instead of a hung proxy.
const callTimeout = 30 * time.Second

func newNode(configJSON string) (*node, error) {
	var cfg config
	dec := json.NewDecoder(strings.NewReader(configJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("invalid node configuration: %w", err)
	}
	if cfg.Dir == "" {
		return nil, errors.New("node configuration: state directory is required")
	}
	if cfg.Hostname == "" {
		return nil, errors.New("node configuration: hostname is required")
	}
	if err := checkStateDir(cfg.Dir); err != nil {
		return nil, err
	}
	// Environment knobs must be set through Go: Go copied the process
	// environment when the archive initialised, so Rust's set_var is
	// invisible here. Most TS_* knobs are read lazily, at first use.
	for k, v := range cfg.Env {
		if !strings.HasPrefix(k, "TS_") {
			return nil, fmt.Errorf("node configuration: env knob %q is not a TS_* variable", k)
		}
		os.Setenv(k, v)
	}
	logf, closer, err := openLog(cfg.Log)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{
		srv: &tsnet.Server{
			Dir:           cfg.Dir,
			Hostname:      cfg.Hostname,
			AuthKey:       cfg.AuthKey,
			ControlURL:    cfg.ControlURL,
			Ephemeral:     cfg.Ephemeral,
			AdvertiseTags: cfg.AdvertiseTags,
			Logf:          logf,
			// tsnet prints the interactive login URL through UserLogf;
			// tailgres surfaces it from status instead, in its own log.
			UserLogf: logf,
		},
		ctx:    ctx,
		cancel: cancel,
		logOut: closer,
	}
	return n, nil
}

// checkStateDir creates the state directory if needed and proves it is
// writable now, so a read-only mount fails with a clear message at start
// instead of an obscure one from deep inside tsnet.
func checkStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory %s cannot be created: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("state directory %s is not writable: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return nil
}

func openLog(dest string) (logger.Logf, io.Closer, error) {
	switch dest {
	case "":
		return logger.Discard, nil, nil
	case "stderr":
		l := log.New(os.Stderr, "tsnet: ", log.LstdFlags|log.Lmicroseconds)
		return l.Printf, nil, nil
	default:
		f, err := os.OpenFile(dest, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("tailnet log file %s cannot be opened: %w", dest, err)
		}
		l := log.New(f, "", log.LstdFlags|log.Lmicroseconds)
		return l.Printf, f, nil
	}
}

func (n *node) start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return errors.New("node is closed")
	}
	if n.started {
		return nil
	}
	if err := n.srv.Start(); err != nil {
		return fmt.Errorf("starting the tailnet node: %w", err)
	}
	lc, err := n.srv.LocalClient()
	if err != nil {
		return fmt.Errorf("starting the tailnet node: %w", err)
	}
	n.started = true
	n.lc = lc
	go n.followErrors(lc)
	return nil
}

// followErrors records the backend's error messages (a rejected auth key,
// an unreachable control server) so status can report them: tsnet itself
// only prints them.
func (n *node) followErrors(lc *local.Client) {
	w, err := lc.WatchIPNBus(n.ctx, ipn.NotifyInitialState)
	if err != nil {
		return
	}
	defer w.Close()
	for {
		note, err := w.Next()
		if err != nil {
			return
		}
		n.mu.Lock()
		if note.ErrMessage != nil {
			n.lastErr = *note.ErrMessage
		}
		if note.State != nil && *note.State == ipn.Running {
			n.lastErr = ""
		}
		n.mu.Unlock()
	}
}

// client returns the in-process LocalAPI client, or an error before start
// or after close.
func (n *node) client() (*local.Client, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case n.closed:
		return nil, errors.New("node is closed")
	case !n.started:
		return nil, errors.New("node is not started")
	}
	return n.lc, nil
}

func (n *node) callCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(n.ctx, callTimeout)
}

type statusJSON struct {
	BackendState   string   `json:"backend_state"`
	AuthURL        string   `json:"auth_url"`
	TailscaleIPs   []string `json:"tailscale_ips"`
	DNSName        string   `json:"dns_name"`
	MagicDNSSuffix string   `json:"magic_dns_suffix"`
	CertDomains    []string `json:"cert_domains"`
	StableID       string   `json:"stable_id"`
	HomeDERP       string   `json:"home_derp"`
	Health         []string `json:"health"`
	LastError      string   `json:"last_error"`
}

func (n *node) status() ([]byte, error) {
	lc, err := n.client()
	if err != nil {
		return nil, err
	}
	ctx, cancel := n.callCtx()
	defer cancel()
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		return nil, fmt.Errorf("tailnet status: %w", err)
	}
	out := statusJSON{
		BackendState:   st.BackendState,
		AuthURL:        st.AuthURL,
		MagicDNSSuffix: st.MagicDNSSuffix,
		CertDomains:    nonNil(st.CertDomains),
		Health:         nonNil(st.Health),
		TailscaleIPs:   []string{},
	}
	for _, ip := range st.TailscaleIPs {
		out.TailscaleIPs = append(out.TailscaleIPs, ip.String())
	}
	n.mu.Lock()
	out.LastError = n.lastErr
	n.mu.Unlock()
	if st.Self != nil {
		out.DNSName = strings.TrimSuffix(st.Self.DNSName, ".")
		out.StableID = string(st.Self.ID)
		out.HomeDERP = st.Self.Relay
	}
	return json.Marshal(out)
}

func (n *node) certPair(domain string) (cert, key []byte, err error) {
	lc, err := n.client()
	if err != nil {
		return nil, nil, err
	}
	// Issuing a certificate can take a while (ACME); allow more than a
	// plain call, but never forever.
	ctx, cancel := context.WithTimeout(n.ctx, 3*time.Minute)
	defer cancel()
	cert, key, err = lc.CertPair(ctx, domain)
	if err != nil {
		return nil, nil, fmt.Errorf("HTTPS certificate for %s: %w", domain, err)
	}
	return cert, key, nil
}

func (n *node) close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	started := n.started
	n.mu.Unlock()
	n.cancel()
	closeConns(func(tc *tconn) bool { return tc.owner == n }, false)
	// tsnet.Server.Close must not run before Start; a node that never
	// started has nothing to shut down.
	if started {
		n.srv.Close()
		forgetBackend(n.srv.Sys())
	}
	if n.logOut != nil {
		n.logOut.Close()
	}
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
