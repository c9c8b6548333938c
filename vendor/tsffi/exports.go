// Package main is tailgres's embedded Tailscale node, built as a C archive
// (go build -buildmode=c-archive) and linked into the Rust binary. The C API
// is documented in tsffi.h; this file only converts between C and Go and
// keeps the handle table. The work happens in node.go, listen.go, watch.go.
package main

/*
#include <stdlib.h>
#include <string.h>
#include "tsffi.h"
*/
import "C"

import (
	"errors"
	"sync"
	"syscall"
	"unsafe"
)

func main() {} // required by -buildmode=c-archive; never runs

var (
	handlesMu  sync.Mutex
	handles          = map[C.int]*node{}
	nextHandle C.int = 1
)

func lookup(h C.int) (*node, error) {
	handlesMu.Lock()
	defer handlesMu.Unlock()
	n, ok := handles[h]
	if !ok {
		return nil, errors.New("tsffi: unknown or closed node handle")
	}
	return n, nil
}

// fail writes msg into the caller's buffer (always NUL-terminated) and
// returns -1, the C API's failure value.
func fail(err error, buf *C.char, n C.size_t) C.int {
	if buf != nil && n > 0 {
		msg := err.Error()
		if len(msg) > int(n)-1 {
			msg = msg[:int(n)-1]
		}
		dst := unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(n))
		copy(dst, msg)
		dst[len(msg)] = 0
	}
	return -1
}

//export tsffi_new
func tsffi_new(config *C.char, errbuf *C.char, errlen C.size_t) C.int {
	n, err := newNode(C.GoString(config))
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	handlesMu.Lock()
	defer handlesMu.Unlock()
	h := nextHandle
	nextHandle++
	handles[h] = n
	return h
}

//export tsffi_start
func tsffi_start(h C.int, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	if err == nil {
		err = n.start()
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	return 0
}

//export tsffi_status
func tsffi_status(h C.int, out **C.char, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	var js []byte
	if err == nil {
		js, err = n.status()
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*out = C.CString(string(js))
	return 0
}

//export tsffi_listen
func tsffi_listen(h C.int, network, addr *C.char, outFD *C.int, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	fd := -1
	if err == nil {
		fd, err = n.listen(C.GoString(network), C.GoString(addr))
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*outFD = C.int(fd)
	return 0
}

//export tsffi_listen_service
func tsffi_listen_service(h C.int, name *C.char, port C.ushort, outFD *C.int, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	fd := -1
	if err == nil {
		fd, err = n.listenService(C.GoString(name), uint16(port))
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*outFD = C.int(fd)
	return 0
}

//export tsffi_withdraw_service
func tsffi_withdraw_service(h C.int, name *C.char, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	if err == nil {
		err = n.withdrawService(C.GoString(name))
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	return 0
}

//export tsffi_dial
func tsffi_dial(h C.int, addr *C.char, outConn *C.ulonglong, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	var id uint64
	if err == nil {
		id, err = n.dial(C.GoString(addr))
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*outConn = C.ulonglong(id)
	return 0
}

//export tsffi_whois
func tsffi_whois(h C.int, ip *C.uchar, port C.ushort, out **C.char, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	var js []byte
	if err == nil {
		var ip16 [16]byte
		copy(ip16[:], C.GoBytes(unsafe.Pointer(ip), 16))
		js, err = n.whois(addrPortOf(ip16, uint16(port)))
	}
	if errors.Is(err, errNoNode) {
		*out = nil
		return 1
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*out = C.CString(string(js))
	return 0
}

//export tsffi_cert_pair
func tsffi_cert_pair(h C.int, domain *C.char, certOut, keyOut **C.char, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	var cert, key []byte
	if err == nil {
		cert, key, err = n.certPair(C.GoString(domain))
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*certOut = C.CString(string(cert))
	*keyOut = C.CString(string(key))
	clear(key)
	return 0
}

//export tsffi_watch
func tsffi_watch(h C.int, outFD *C.int, errbuf *C.char, errlen C.size_t) C.int {
	n, err := lookup(h)
	fd := -1
	if err == nil {
		fd, err = n.watch()
	}
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	*outFD = C.int(fd)
	return 0
}

//export tsffi_close
func tsffi_close(h C.int) C.int {
	handlesMu.Lock()
	n, ok := handles[h]
	delete(handles, h)
	handlesMu.Unlock()
	if ok {
		n.close()
	}
	return 0
}

// onConn runs op on the connection id names; an unknown (or already
// closed) id gives -ECONNABORTED, as every tsffi_conn_* call documents.
func onConn(id C.ulonglong, op func(*tconn) int64) int64 {
	tc := lookupConn(id)
	if tc == nil {
		return -int64(syscall.ECONNABORTED)
	}
	return op(tc)
}

//export tsffi_conn_attach
func tsffi_conn_attach(id C.ulonglong, wake C.tsffi_wake_fn, ctx unsafe.Pointer) C.int {
	return C.int(onConn(id, func(tc *tconn) int64 {
		if err := tc.attach(wake, ctx); err != nil {
			return -int64(err.(syscall.Errno))
		}
		return 0
	}))
}

//export tsffi_conn_read
func tsffi_conn_read(id C.ulonglong, buf unsafe.Pointer, n C.size_t, drained *C.int) C.longlong {
	return C.longlong(onConn(id, func(tc *tconn) int64 {
		var d bool
		ret := tc.read(unsafe.Slice((*byte)(buf), int(n)), &d)
		if d {
			*drained = 1
		}
		return ret
	}))
}

//export tsffi_conn_write
func tsffi_conn_write(id C.ulonglong, iov *C.struct_iovec, n C.size_t) C.longlong {
	return C.longlong(onConn(id, func(tc *tconn) int64 { return tc.write(unsafe.Slice(iov, int(n))) }))
}

//export tsffi_conn_shutdown_write
func tsffi_conn_shutdown_write(id C.ulonglong) C.int {
	return C.int(onConn(id, (*tconn).shutdownWrite))
}

//export tsffi_conn_close
func tsffi_conn_close(id C.ulonglong) {
	if tc := lookupConn(id); tc != nil {
		tc.close(uint64(id), false, false)
	}
}

//export tsffi_free
func tsffi_free(p *C.char) {
	C.free(unsafe.Pointer(p))
}

//export tsffi_free_secret
func tsffi_free_secret(p *C.char) {
	if p != nil {
		C.memset(unsafe.Pointer(p), 0, C.strlen(p))
	}
	C.free(unsafe.Pointer(p))
}
