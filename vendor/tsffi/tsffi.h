/*
 * tsffi.h — the C API of tailgres's embedded Tailscale node.
 *
 * This one header is read by cgo (the Go side includes it, so the compiler
 * checks the exported functions against it) and by bindgen (the Rust side).
 * Types are deliberately plain `char *` (not const): cgo generates exactly
 * these prototypes for the exported Go functions.
 *
 * Conventions:
 *   - Every function that can fail returns 0 on success and -1 on failure,
 *     and then writes a NUL-terminated, human-readable reason into
 *     `err[0..errlen)` (truncated if needed).
 *   - Strings returned through `char **out` are allocated with malloc and
 *     must be released with tsffi_free (or tsffi_free_secret for key
 *     material, which zeroes the memory first).
 *   - A node is an int handle (> 0) returned by tsffi_new.
 *   - File descriptors returned to the caller are owned by the caller
 *     (close them when done); they are close-on-exec.
 *   - Tailnet connections are unsigned 64-bit ids (never reused); the
 *     tsffi_conn_* calls return -errno rather than writing a message.
 */
#ifndef TAILGRES_TSFFI_H
#define TAILGRES_TSFFI_H

#include <stddef.h>
#include <sys/uio.h>

/*
 * tsffi_new creates (but does not start) a node from a JSON configuration:
 *   {"dir": "/var/lib/tailgres",           state directory (required)
 *    "hostname": "pg",                     tailnet hostname (required)
 *    "auth_key": "tskey-...",             optional; empty = interactive login
 *    "control_url": "https://...",        optional; empty = Tailscale's
 *    "ephemeral": false,
 *    "advertise_tags": ["tag:db-proxy"],
 *    "log": "" | "stderr" | "/path/file", where tsnet's verbose log goes
 *    "env": {"TS_NO_LOGS_NO_SUPPORT": "true"}  set with Go's os.Setenv
 *   }                                         before the node starts
 * Returns the handle, or -1.
 */
int tsffi_new(char *config_json, char *err, size_t errlen);

/* tsffi_start begins connecting to the tailnet and returns at once; poll
 * tsffi_status until BackendState is "Running" (or "NeedsLogin": the
 * AuthURL field then holds the interactive login URL). */
int tsffi_start(int node, char *err, size_t errlen);

/* tsffi_status returns a JSON object:
 *   {"backend_state": "Running", "auth_url": "", "tailscale_ips": [...],
 *    "dns_name": "pg.example.ts.net", "magic_dns_suffix": "example.ts.net",
 *    "cert_domains": [...], "stable_id": "...", "home_derp": "...",
 *    "health": [...], "last_error": "backend error, e.g. a rejected auth key"} */
int tsffi_status(int node, char **out_json, char *err, size_t errlen);

/* tsffi_listen listens on the tailnet ("tcp", ":5432") and returns, in
 * *out_fd, one end of an AF_UNIX SOCK_SEQPACKET socketpair. Each accepted
 * connection arrives there as ONE message of TSFFI_ANNOUNCE_LEN bytes: the
 * connection id (8 bytes, little-endian), the peer's IP address (16 bytes,
 * network order; IPv4 as ::ffff:a.b.c.d) and its port (2 bytes, network
 * order). An address is a value here, never text.
 * The caller then owns the connection: it must call tsffi_conn_attach, and
 * tsffi_conn_close when done. Closing *out_fd closes the tailnet listener
 * (and the connections announced on it that were never attached). */
int tsffi_listen(int node, char *network, char *addr, int *out_fd,
                 char *err, size_t errlen);
#define TSFFI_ANNOUNCE_LEN 26

/* tsffi_listen_service makes the node a host of the Tailscale Service
 * name ("svc:db") on TCP port (tsnet ListenService; the node must be
 * tagged). tsnet forwards each Service connection to a loopback TCP
 * listener behind a PROXY protocol v2 header; *out_fd is a duplicate of
 * that listening socket, which the caller accepts on. Any local process
 * can reach it: the caller must check where each connection comes from. */
int tsffi_listen_service(int node, char *name, unsigned short port, int *out_fd,
                         char *err, size_t errlen);

/* tsffi_withdraw_service stops advertising the Service (new connections go
 * to other hosts) and closes tsnet's listener; the caller closes its fd. */
int tsffi_withdraw_service(int node, char *name, char *err, size_t errlen);

/* tsffi_dial connects to a tailnet peer ("100.64.0.7:5432", at most 10 s)
 * and returns a connection id, used as an accepted one is (attach, read,
 * write, close). */
int tsffi_dial(int node, char *addr, unsigned long long *out_conn,
               char *err, size_t errlen);

/* A tailnet connection is read and written without blocking, straight
 * from the node's TCP/IP stack (no socket in between). When a call returns
 * -EAGAIN, wake(ctx, events) follows once the connection may have changed:
 * events has TSFFI_READABLE and/or TSFFI_WRITABLE set (both on hang-up or
 * error). wake runs on one of the node's threads, must not block and must
 * not call back into tsffi; it may be called spuriously, so retry the call
 * and wait again on -EAGAIN. After tsffi_conn_close returns, wake is never
 * called with that ctx again. Errors are -errno: -EAGAIN, -EPIPE,
 * -ECONNRESET, -ECONNABORTED (also: unknown id, or the node closed it),
 * -ENOTCONN, -ETIMEDOUT, -EIO. One thread at a time may read, and one
 * may write, a given connection. */
#define TSFFI_READABLE 1u
#define TSFFI_WRITABLE 2u
typedef void (*tsffi_wake_fn)(void *ctx, unsigned int events);

/* tsffi_conn_attach registers the wake callback (once). Returns 0 or
 * -errno. */
int tsffi_conn_attach(unsigned long long conn, tsffi_wake_fn wake, void *ctx);

/* tsffi_conn_read returns the number of bytes read (> 0), 0 at end of
 * stream (the peer half-closed), or -errno. It sets *drained to 1 (and
 * otherwise leaves it alone) when the read left nothing to take: no data
 * queued, no end of stream or error pending. wake(READABLE) follows any
 * later change, so until the next wake the caller may take the
 * connection as empty without calling again. */
long long tsffi_conn_read(unsigned long long conn, void *buf, size_t len, int *drained);

/* tsffi_conn_write writes the iovcnt buffers at iov, in order, as one
 * write: a TLS flight of several records leaves in full segments rather
 * than a segment per record. It returns the number of bytes taken (maybe
 * fewer than the buffers hold, and then the first ones) or -errno. It may
 * wait briefly while the node's outbound packet queue is full. The buffers
 * are only read, and only during the call. */
long long tsffi_conn_write(unsigned long long conn, struct iovec *iov, size_t iovcnt);

/* tsffi_conn_shutdown_write half-closes: the peer reads end of stream. */
int tsffi_conn_shutdown_write(unsigned long long conn);

/* tsffi_conn_close closes the connection (idempotent, any id). */
void tsffi_conn_close(unsigned long long conn);

/* The data phase. tsffi_relay_start hands a tailnet connection and the
 * database's TCP socket (upstream_fd, which the node takes over and closes
 * even on failure) to the node, whose goroutines then move the bytes: one
 * reader per side, in the node's own scheduler, as tsnet's own connections
 * are served. The caller's engine (ops, ctx) decides everything; the node
 * calls it on its threads, never two calls with the same side's writes at
 * once, and no call may block or call back into tsffi:
 *   begin(ctx, side): before the side's first read (side: TSFFI_CLIENT or
 *     TSFFI_UPSTREAM); returns bits as input does.
 *   input(ctx, side, buf, len): bytes read from side (len 0: end of
 *     stream); returns TSFFI_RELAY_* bits: WRITE_CLIENT / WRITE_UPSTREAM
 *     (call output for that side until it returns less than cap and write
 *     it all, under that side's write lock; output made later is reported
 *     to the call that made it), HALF_CLOSE (then shut down the other side's
 *     write; this side's reader is done), END (the session is over).
 *   output(ctx, side, buf, cap): fills buf with bytes to write to side.
 *   failed(ctx, side, writing, errno): a read (writing 0) or write failed;
 *     returns bits as input does.
 *   done(ctx): both connections are closed; ctx is never used again.
 * On END, or tsffi_relay_kick, the readers stop and every write from then on
 * has grace_ms to finish; then the pending output of both sides is written,
 * both connections closed and done called. tsffi_conn_attach's callback is
 * never called again once tsffi_relay_start returns, and the caller must not
 * use the connection id except to kick. ops is only read. Returns 0 or
 * -errno. */
#define TSFFI_CLIENT 0
#define TSFFI_UPSTREAM 1
#define TSFFI_RELAY_WRITE_CLIENT 1u
#define TSFFI_RELAY_WRITE_UPSTREAM 2u
#define TSFFI_RELAY_HALF_CLOSE 4u
#define TSFFI_RELAY_END 8u
typedef struct tsffi_relay_ops {
    unsigned int (*begin)(void *ctx, int side);
    unsigned int (*input)(void *ctx, int side, const unsigned char *buf, size_t len);
    size_t (*output)(void *ctx, int side, unsigned char *buf, size_t cap);
    unsigned int (*failed)(void *ctx, int side, int writing, int err);
    void (*done)(void *ctx);
} tsffi_relay_ops;
int tsffi_relay_start(unsigned long long conn, int upstream_fd, tsffi_relay_ops *ops,
                      void *ctx, unsigned int grace_ms);

/* tsffi_relay_start_sockets is tsffi_relay_start for a client that is a
 * host TCP socket (a Tailscale Service's connection, handed over on
 * loopback) rather than a tailnet connection: the node takes both
 * descriptors over (closing them even on failure), reads each with one
 * goroutine, and returns the relay's id (for tsffi_relay_kick) in *out_id. */
int tsffi_relay_start_sockets(int client_fd, int upstream_fd, tsffi_relay_ops *ops,
                              void *ctx, unsigned int grace_ms, unsigned long long *out_id);

/* tsffi_relay_kick starts a relay's wind-down (the engine has decided to
 * stop it); unknown ids are ignored. */
void tsffi_relay_kick(unsigned long long conn);

/* Tasks. tsffi_task_start polls the caller's task on a goroutine of the
 * node's scheduler: poll(ctx) runs at once, and again after each
 * tsffi_task_wake(id) (wakes while a poll runs, or before the next one,
 * make one more poll), until it returns nonzero; then the task is over and
 * ctx is never used again. poll runs on one of the node's threads and may
 * call into tsffi (including tsffi_task_wake); it should not block for
 * long. Polls never overlap, and a task holds a goroutine only while it
 * is polled. id is the caller's, unique among running tasks. tsffi_task_wake
 * may be called from any thread, at any time; an id with no running task
 * is ignored. */
typedef int (*tsffi_poll_fn)(void *ctx);
void tsffi_task_start(unsigned long long id, tsffi_poll_fn poll, void *ctx);
void tsffi_task_wake(unsigned long long id);

/* Watched sockets. tsffi_fd_watch puts a duplicate of the caller's socket
 * fd into the node's netpoller; the caller keeps fd, reads and writes it
 * without blocking, and when a call would block, tsffi_fd_wait(id, events)
 * has wake(ctx, events) called (on one of the node's threads, the same
 * rules as tsffi_conn_attach's callback) once the socket may be ready for
 * events (TSFFI_READABLE, TSFFI_WRITABLE), has failed or hung up. A wait
 * already under way for an event is not started twice; wake may be called
 * spuriously. tsffi_fd_unwatch(id) ends it: when it returns, wake is never
 * called again with ctx (fd stays open). Return 0 or -errno. */
int tsffi_fd_watch(int fd, tsffi_wake_fn wake, void *ctx, unsigned long long *out_id);
int tsffi_fd_wait(unsigned long long id, unsigned int events);
void tsffi_fd_unwatch(unsigned long long id);

/* tsffi_whois identifies the tailnet peer at ip (16 bytes, network order;
 * IPv4 as ::ffff:a.b.c.d) and port straight from the
 * node's backend (no LocalAPI request; the same lookup and capability map
 * as the LocalAPI's /whois) and returns a JSON object:
 *   {"stable_id", "node_name" (no trailing dot), "user_login",
 *    "user_display_name", "tags": [...], "addresses": [...], "os",
 *    "shared_in": bool, "key_expiry": RFC 3339 or null, "expired": bool,
 *    "cap_map": {"example.com/cap/x": [json, ...]}}
 * Returns 1 with *out_json NULL when no tailnet node has the address (an
 * unknown peer), and fails (-1) when the lookup itself cannot be made. */
int tsffi_whois(int node, unsigned char *ip, unsigned short port,
                char **out_json, char *err, size_t errlen);

/* tsffi_cert_pair fetches (or renews) the HTTPS certificate and key for a
 * domain in the node's cert_domains, as PEM. Release *key_pem with
 * tsffi_free_secret. */
int tsffi_cert_pair(int node, char *domain, char **cert_pem, char **key_pem,
                    char *err, size_t errlen);

/* tsffi_watch returns, in *out_fd, the read end of a stream socket on which
 * the node writes one JSON line per change:
 *   {"seq": n, "kind": K, "peers": [{"node_id", "stable_id", "node_name", "addresses",
 *    "tags", "user_id", "expired"}, ...], "removed": [node_id, ...]}
 * where K is "netmap" (first line: every peer), "peers_changed" (added, or
 * tags, capabilities, key expiry changed), "peers_removed" or
 * "self_changed". Capability grants travel in the packet filter, whose
 * changes are not announced: a consumer that cares re-checks identities
 * (tsffi_whois) on every line AND periodically. Closing the fd ends the
 * watch. */
int tsffi_watch(int node, int *out_fd, char *err, size_t errlen);

/* tsffi_close shuts the node down. Safe in every state: before start,
 * while starting (it cancels the start), running, or already closed.
 * Listener and watch fds handed out earlier see EOF. */
int tsffi_close(int node);

void tsffi_free(char *p);
void tsffi_free_secret(char *p);

#endif
