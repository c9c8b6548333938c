// pgx v5 through tailgres, as Go programs use it (pgx.Connect with a libpq
// connection string). For one sslmode: login, a query with parameters
// (the extended protocol), then a running `select pg_sleep(20)` cancelled
// by cancelling its context. pgx's default on a cancelled context closes
// the connection; the handler most applications configure instead,
// pgconn.CancelRequestContextWatcherHandler, sends a CancelRequest on a new
// connection (over TLS when the session is, since pgx 5.13), so the query
// must fail with SQLSTATE 57014 and the connection stay usable.
//
// Prints one JSON line with what happened; exits non-zero on any failure.
//
//	pgx-check HOST PORT SSLMODE(disable|prefer|require) [MAX_PROTOCOL_VERSION]
//
// With MAX_PROTOCOL_VERSION (pgx's max_protocol_version: 3.0, 3.2, latest)
// the client asks for that protocol; the application name then ends in it.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "pgx-check: "+format+"\n", args...)
	os.Exit(1)
}

func pgxVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/jackc/pgx/v5" {
				return d.Version
			}
		}
	}
	return "unknown"
}

// login is the user (CHECK_USER, default role_scram) and password
// (CHECK_PASSWORD, default scram-pass; set empty for none: identity login).
func login() string {
	user, ok := os.LookupEnv("CHECK_USER")
	if !ok {
		user = "role_scram"
	}
	password, ok := os.LookupEnv("CHECK_PASSWORD")
	if !ok {
		password = "scram-pass"
	}
	if password == "" {
		return "user=" + user
	}
	return "user=" + user + " password=" + password
}

func main() {
	if len(os.Args) != 4 && len(os.Args) != 5 {
		fail("usage: pgx-check HOST PORT SSLMODE [MAX_PROTOCOL_VERSION]")
	}
	host, sslmode := os.Args[1], os.Args[3]
	port, err := strconv.Atoi(os.Args[2])
	if err != nil {
		fail("port %q: %v", os.Args[2], err)
	}
	app, extra := "pgx-"+sslmode, ""
	if len(os.Args) == 5 {
		app += "-" + os.Args[4]
		extra = " max_protocol_version=" + os.Args[4]
	}
	// sslmode=prefer and require do not verify the certificate (libpq's
	// meaning, which pgx follows): the lab proxy's certificate is
	// self-signed. The password is in the string as the python checks pass it.
	// CHECK_OPTIONS: more settings (e.g. channel_binding=require).
	if o := os.Getenv("CHECK_OPTIONS"); o != "" {
		extra += " " + o
	}
	connString := fmt.Sprintf("host=%s port=%d %s dbname=app "+
		"sslmode=%s application_name=%s connect_timeout=30%s", host, port, login(), sslmode, app, extra)
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		fail("parse config: %v", err)
	}
	cfg.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		// Cancel at once; if no answer comes within 15 s, the deadline
		// breaks the connection and the check fails (not 57014).
		return &pgconn.CancelRequestContextWatcherHandler{Conn: c, DeadlineDelay: 15 * time.Second}
	}
	out := map[string]any{"driver": "pgx", "version": pgxVersion(), "sslmode": sslmode}

	ctx, done := context.WithTimeout(context.Background(), 90*time.Second)
	defer done()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		fail("connect (sslmode=%s): %v", sslmode, err)
	}
	_, tlsInUse := conn.PgConn().Conn().(*tls.Conn)
	out["ssl_in_use"] = tlsInUse
	out["pid"] = conn.PgConn().PID()
	out["secret_key_bytes"] = len(conn.PgConn().SecretKey())

	var answer int
	if err := conn.QueryRow(ctx, "select $1::int + 1", 41).Scan(&answer); err != nil {
		fail("query: %v", err)
	}
	out["answer"] = answer

	// Cancel a running query by cancelling its context, 1 s in.
	qctx, cancel := context.WithCancel(ctx)
	timer := time.AfterFunc(time.Second, cancel)
	started := time.Now()
	_, err = conn.Exec(qctx, "select pg_sleep(20)")
	timer.Stop()
	cancel()
	out["cancel_seconds"] = roundSeconds(time.Since(started))
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		fail("pg_sleep(20) finished: the cancel did not reach the database")
	case errors.As(err, &pgErr):
		out["query_sqlstate"] = pgErr.Code
		out["query_error"] = pgErr.Message
		if pgErr.Code != "57014" {
			fail("pg_sleep(20) failed with %s %s, not 57014", pgErr.Code, pgErr.Message)
		}
	default:
		fail("pg_sleep(20) failed without a server error (the cancel did not arrive before the deadline?): %v", err)
	}
	if conn.IsClosed() {
		fail("the connection was closed by the cancel")
	}

	var after int
	if err := conn.QueryRow(ctx, "select 7").Scan(&after); err != nil {
		fail("query after the cancel: %v", err)
	}
	out["after_cancel"] = after

	started = time.Now()
	cctx, cdone := context.WithTimeout(context.Background(), 10*time.Second)
	defer cdone()
	if err := conn.Close(cctx); err != nil {
		fail("close: %v", err)
	}
	out["close_seconds"] = roundSeconds(time.Since(started))

	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

func roundSeconds(d time.Duration) float64 {
	return float64(d.Milliseconds()) / 1000
}
