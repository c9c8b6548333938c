// Command tslab runs a self-contained Tailscale tailnet on the loopback
// interface, for testing tailgres without touching the real Tailscale
// control plane or any non-loopback network.
//
// Usage:
//
//	tslab control [--admin-addr 127.0.0.1:0] [--auth-key KEY] [--ready-file PATH] [-v]
//	tslab node --control-url URL --hostname NAME --state-dir DIR [flags]
//
// "tslab control" runs a DERP server, a STUN responder, Tailscale's test
// control server (tailscale.com/tstest/integration/testcontrol) and an
// admin JSON API that can retag, expire and delete nodes, install a
// grants-style access policy and define Tailscale Services (a VIP that
// tagged nodes host with tsnet's ListenService). See control.go,
// policy.go and services.go.
//
// "tslab node" runs one tsnet node that forwards loopback TCP ports into
// the tailnet, and with --serve relays tailnet ports to loopback ones (a
// plain TCP forward; the benchmark's "tailnet floor"). See node.go. Its
// --echo PORT flag, left out of -h, also serves a TCP echo on the node's
// tailnet port PORT, which gives smoke tests something to dial.
//
// Both subcommands print one JSON line on stdout once ready (and write
// it to --ready-file, atomically) and run until SIGINT or SIGTERM.
//
// Every address tslab listens on or dials outside the tailnet must be a
// loopback address; anything else is refused.
package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"tailscale.com/types/logger"
)

const usage = `usage:
  tslab control [--admin-addr 127.0.0.1:0] [--auth-key KEY] [--ready-file PATH] [-v]
  tslab node --control-url URL --hostname NAME --state-dir DIR [--auth-key KEY]
             [--advertise-tags tag:a,tag:b] [--forward LISTEN=TARGET]...
             [--serve PORT=TARGET]...
             [--announce-src] [--dial-timeout 5s] [--timeout 60s] [--direct]
             [--ready-file PATH] [-v]

Run "tslab control -h" or "tslab node -h" for details.
`

// labEnv is the environment every tailnet process in the lab must run
// with (lab.env says what each setting is for; it is the one list, shared
// with the Rust tests and the benchmark).
type envVar struct{ name, value string }

//go:embed lab.env
var labEnvFile string

var labEnv = parseLabEnv(labEnvFile)

// parseLabEnv reads KEY=VALUE lines, skipping blank lines and # comments.
func parseLabEnv(text string) []envVar {
	var out []envVar
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			panic("tslab: lab.env: not KEY=VALUE: " + line)
		}
		out = append(out, envVar{k, v})
	}
	return out
}

// ensureLabEnv re-executes the current binary with labEnv and extra
// applied if any of it is missing. Some of these knobs are read in
// package init functions (envknob.RegisterBool), so setting them with
// os.Setenv would be too late; an exec keeps the PID, so callers that
// track the process are unaffected. Subcommands call it after parsing
// their flags, which the re-executed process parses again.
func ensureLabEnv(extra ...envVar) error {
	missing := false
	for _, kv := range append(slices.Clone(labEnv), extra...) {
		if v, err := strconv.ParseBool(os.Getenv(kv.name)); err != nil || !v {
			os.Setenv(kv.name, kv.value)
			missing = true
		}
	}
	if !missing {
		return nil
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("re-exec with lab environment: %w", err)
	}
	return syscall.Exec(exe, os.Args, os.Environ())
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "control":
		err = runControl(os.Args[2:])
	case "node":
		err = runNode(os.Args[2:])
	case "-h", "-help", "--help", "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "tslab: unknown subcommand %q\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		// -h: usage already printed.
	case errors.Is(err, errBadFlags):
		os.Exit(2) // the flag package already said why
	default:
		fatalf("%v", err)
	}
}

var errBadFlags = errors.New("bad flags")

// parseError maps a FlagSet.Parse error to what main expects.
func parseError(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return errBadFlags
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tslab: "+format+"\n", args...)
	os.Exit(1)
}

// setupLogging returns the logger for tslab and the Tailscale libraries.
// Several of those libraries (testcontrol, DERP, AcceptHTTP) also write
// straight to the standard log package, so it is redirected as well:
// stdout is reserved for the single ready line.
func setupLogging(verbose bool, prefix string) logger.Logf {
	if !verbose {
		log.SetOutput(io.Discard)
		return logger.Discard
	}
	log.SetOutput(os.Stderr)
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix(prefix)
	return log.Printf
}

// signalContext returns a context canceled on SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// announceReady prints v as one JSON line on stdout and, if path is set,
// writes the same line to path atomically so a poller never sees a
// partial file.
func announceReady(v any, path string) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if path != "" {
		if err := writeFileAtomic(path, b); err != nil {
			return fmt.Errorf("writing ready file: %w", err)
		}
	}
	_, err = os.Stdout.Write(b)
	return err
}

func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// parseLoopbackAddrPort parses a literal "ip:port" whose IP is loopback.
// Host names (even "localhost") are refused so that nothing depends on
// the system resolver.
func parseLoopbackAddrPort(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: want a literal loopback ip:port: %w", s, err)
	}
	if !ap.Addr().IsLoopback() {
		return netip.AddrPort{}, fmt.Errorf("%q: only loopback addresses are allowed", s)
	}
	return ap, nil
}

// listenLoopbackTCP listens on a literal loopback ip:port (port may be 0).
func listenLoopbackTCP(s string) (net.Listener, error) {
	ap, err := parseLoopbackAddrPort(s)
	if err != nil {
		return nil, err
	}
	return net.Listen("tcp", ap.String())
}

// checkLoopbackURL verifies that u is an http(s) URL whose host is a
// literal loopback IP.
func checkLoopbackURL(u string) error {
	pu, err := url.Parse(u)
	if err != nil {
		return err
	}
	if pu.Scheme != "http" && pu.Scheme != "https" {
		return fmt.Errorf("%q: scheme must be http or https", u)
	}
	ip, err := netip.ParseAddr(pu.Hostname())
	if err != nil || !ip.IsLoopback() {
		return errors.New(u + ": host must be a literal loopback IP")
	}
	return nil
}
