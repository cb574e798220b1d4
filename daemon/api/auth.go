package api

// Authorization of API calls (docs/security.md).
//
// The socket's mode (0660 root:<socket_group>) decides who may talk to the
// agent at all. Among those, the kernel's credentials of the peer decide
// what a call may do:
//
//   - uid 0 and members of [agent] admin_group may call every route;
//   - everyone else may call the routes registered as Read.
//
// Every route is registered through a Router with an explicit Access; there
// is no way to register a route on a Router without one, and the Router's
// table (Routes) is what the tests walk.
//
// Credentials are taken when the server accepts the connection
// (ConnContext, installed as http.Server.ConnContext): SO_PEERCRED gives
// the uid, gid and pid the peer had when it called connect(), and
// SO_PEERGROUPS its supplementary groups at that same moment. Both are
// snapshots kept by the kernel on the socket, so they cannot race with the
// peer exiting, changing its credentials or its pid being reused. Only on
// kernels without SO_PEERGROUPS (before 4.13) are the supplementary groups
// read from /proc/<pid>/status instead, right at accept time; there the pid
// may already have exited (then only the primary gid counts) or, in theory,
// been reused by another process: the groups are only taken when that
// file's effective uid still equals the SO_PEERCRED uid. Groups are never
// looked up by user name (os/user): that database is not what the process
// holds (newgrp, sg, systemd SupplementaryGroups= differ from it), and the
// agent is built without cgo, so NSS groups (LDAP, sssd) would be missed.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Access is the decision every route carries: who may call it.
type Access uint8

const (
	// invalid is the zero Access: registering a route with it panics, so a
	// forgotten decision cannot silently mean "anyone".
	invalid Access = iota
	// Read routes change nothing: every caller that can open the socket
	// may call them. Only GET routes may be Read.
	Read
	// Admin routes change the agent (or reveal its configuration): uid 0
	// and members of [agent] admin_group only.
	Admin
)

func (a Access) String() string {
	switch a {
	case Read:
		return "read"
	case Admin:
		return "admin"
	}
	return "invalid(" + strconv.Itoa(int(a)) + ")"
}

// Creds are the kernel's credentials of the process at the other end of a
// connection, taken when it connected.
type Creds struct {
	PID int32
	UID uint32
	// GID is the effective gid, Groups the supplementary groups.
	GID    uint32
	Groups []uint32
}

// credsKey is the context key of a connection's credentials.
type credsKey struct{}

// peer is what ConnContext stores: the credentials, or why there are none.
type peer struct {
	creds Creds
	err   error
}

// ConnContext stores the credentials of the connection's peer in ctx. It
// is meant for http.Server.ConnContext; without it every route of a Router
// answers 500 (fail closed), not 200.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return context.WithValue(ctx, credsKey{}, peer{err: fmt.Errorf("connection over %s, not a unix socket", c.LocalAddr().Network())})
	}
	cr, err := unixPeerCreds(uc)
	return context.WithValue(ctx, credsKey{}, peer{creds: cr, err: err})
}

// WithCreds returns ctx carrying cr as the caller's credentials, for
// tests and in-process callers.
func WithCreds(ctx context.Context, cr Creds) context.Context {
	return context.WithValue(ctx, credsKey{}, peer{creds: cr})
}

// PeerCreds returns the caller's credentials stored by ConnContext.
func PeerCreds(ctx context.Context) (Creds, error) {
	p, ok := ctx.Value(credsKey{}).(peer)
	if !ok {
		return Creds{}, errors.New("the API server does not record peer credentials (http.Server.ConnContext is not api.ConnContext)")
	}
	return p.creds, p.err
}

func unixPeerCreds(uc *net.UnixConn) (Creds, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return Creds{}, fmt.Errorf("peer credentials: %w", err)
	}
	var cr Creds
	var uerr, gerr error
	var groups []uint32
	cerr := raw.Control(func(fd uintptr) {
		var u *unix.Ucred
		u, uerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if uerr != nil {
			return
		}
		cr = Creds{PID: u.Pid, UID: u.Uid, GID: u.Gid}
		groups, gerr = peerGroups(int(fd))
	})
	if cerr != nil {
		return Creds{}, fmt.Errorf("peer credentials: %w", cerr)
	}
	if uerr != nil {
		return Creds{}, fmt.Errorf("peer credentials (SO_PEERCRED): %w", uerr)
	}
	switch {
	case gerr == nil:
		cr.Groups = groups
	case errors.Is(gerr, unix.ENOPROTOOPT):
		// Kernel before 4.13: read them from /proc, checked against the
		// uid (see the package comment on the race).
		cr.Groups = procGroups("/proc", cr.PID, cr.UID)
	default:
		return Creds{}, fmt.Errorf("peer groups (SO_PEERGROUPS): %w", gerr)
	}
	return cr, nil
}

// peerGroups reads SO_PEERGROUPS: the peer's supplementary groups when it
// connected.
func peerGroups(fd int) ([]uint32, error) {
	n := 64
	for {
		buf := make([]uint32, n)
		l := uint32(n * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		switch {
		case e == 0:
			return buf[:l/4], nil
		case e == unix.ERANGE && int(l/4) > n && l/4 <= 1<<16:
			n = int(l / 4)
		default:
			return nil, syscall.Errno(e)
		}
	}
}

// procGroups returns the "Groups:" of /proc/<pid>/status when the file's
// effective uid is uid, and nil otherwise (the pid exited, or is no longer
// the process that connected).
func procGroups(proc string, pid int32, uid uint32) []uint32 {
	f, err := os.Open(proc + "/" + strconv.Itoa(int(pid)) + "/status")
	if err != nil {
		return nil
	}
	defer f.Close()
	var groups []uint32
	uidOK := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fs := strings.Fields(v)
		switch k {
		case "Uid": // real, effective, saved, fs
			uidOK = len(fs) >= 2 && fs[1] == strconv.FormatUint(uint64(uid), 10)
		case "Groups":
			for _, s := range fs {
				if g, err := strconv.ParseUint(s, 10, 32); err == nil {
					groups = append(groups, uint32(g))
				}
			}
		}
	}
	if !uidOK || sc.Err() != nil {
		return nil
	}
	return groups
}

// Policy decides who may call Admin routes.
type Policy struct {
	// AdminGroup is [agent] admin_group as configured ("" = none), for
	// messages; AdminGID is its gid when HasAdminGID.
	AdminGroup  string
	AdminGID    uint32
	HasAdminGID bool
}

// NewPolicy resolves the admin group's name to its gid ("" = no admin
// group: only uid 0 may change things). On an error the returned Policy is
// still usable and lets only uid 0 change things.
func NewPolicy(adminGroup string) (Policy, error) {
	p := Policy{AdminGroup: adminGroup}
	if adminGroup == "" {
		return p, nil
	}
	g, err := user.LookupGroup(adminGroup)
	if err != nil {
		return p, fmt.Errorf("[agent] admin_group %q: %w; only root may change the agent", adminGroup, err)
	}
	gid, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		return p, fmt.Errorf("[agent] admin_group %q has gid %q: %w; only root may change the agent", adminGroup, g.Gid, err)
	}
	p.AdminGID, p.HasAdminGID = uint32(gid), true
	return p, nil
}

// IsAdmin reports whether cr may call Admin routes: uid 0, or the admin
// group as primary or supplementary group.
func (p Policy) IsAdmin(cr Creds) bool {
	if cr.UID == 0 {
		return true
	}
	if !p.HasAdminGID {
		return false
	}
	if cr.GID == p.AdminGID {
		return true
	}
	for _, g := range cr.Groups {
		if g == p.AdminGID {
			return true
		}
	}
	return false
}

// Allows reports whether cr may call a route with access a.
func (p Policy) Allows(cr Creds, a Access) bool {
	switch a {
	case Read:
		return true
	case Admin:
		return p.IsAdmin(cr)
	}
	return false
}

// Check is the decision for one call of route (its pattern) with access a
// by the caller whose credentials ctx holds: nil, or the *HTTPError to
// answer (403 with what to do, or 500 when the credentials are unknown).
func (p Policy) Check(ctx context.Context, a Access, route string) error {
	cr, err := PeerCreds(ctx)
	if err != nil {
		return Errorf(http.StatusInternalServerError, "this is a bug of the agent; report it",
			"refused: the agent cannot tell who is calling: %v", err)
	}
	if p.Allows(cr, a) {
		return nil
	}
	what := "changes the agent"
	if method, _, _ := strings.Cut(route, " "); method == http.MethodGet {
		what = "shows the agent's configuration"
	}
	return Errorf(http.StatusForbidden, p.hint(),
		"permission denied: this call (%s) %s, and uid %d may only read", route, what, cr.UID)
}

// hint says how to make a refused call.
func (p Policy) hint() string {
	if p.AdminGroup == "" {
		return "run it as root (no admin group is set: [agent] admin_group can name a group whose members may do it too)"
	}
	return fmt.Sprintf("run it as root or as a member of the admin group %s ([agent] admin_group)", p.AdminGroup)
}

// Route is one entry of a Router's table.
type Route struct {
	// Pattern is the http.ServeMux pattern, "METHOD /path".
	Pattern string
	Access  Access
}

// Router registers routes on a mux, each with its Access, and keeps the
// table of what it registered.
type Router struct {
	mux    *http.ServeMux
	policy Policy
	log    *slog.Logger
	routes []Route
}

// NewRouter returns a Router that registers on mux and decides with p. A
// nil log discards.
func NewRouter(mux *http.ServeMux, p Policy, log *slog.Logger) *Router {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Router{mux: mux, policy: p, log: log}
}

// Handle registers a JSON route (see api.Handle) with its Access.
func (rt *Router) Handle(a Access, pattern string, f func(r *http.Request) (any, error)) {
	rt.HandleFunc(a, pattern, Handle(f).ServeHTTP)
}

// HandleFunc registers a raw route (e.g. a stream) with its Access. It
// panics, at start, on a route without a valid decision, on a pattern
// without a method, and on a Read route whose method is not GET.
func (rt *Router) HandleFunc(a Access, pattern string, f http.HandlerFunc) {
	method, _, ok := strings.Cut(pattern, " ")
	if !ok || method == "" || strings.HasPrefix(method, "/") {
		panic(fmt.Sprintf("api: route %q has no method; write \"GET /v1/...\"", pattern))
	}
	switch a {
	case Read:
		if method != http.MethodGet {
			panic(fmt.Sprintf("api: route %q is %s, which cannot be Read: only GET routes read", pattern, method))
		}
	case Admin:
	default:
		panic(fmt.Sprintf("api: route %q has no access decision (api.Read or api.Admin)", pattern))
	}
	rt.routes = append(rt.routes, Route{Pattern: pattern, Access: a})
	p, log := rt.policy, rt.log
	rt.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if err := p.Check(r.Context(), a, pattern); err != nil {
			cr, _ := PeerCreds(r.Context())
			log.Warn("api call refused", "route", pattern, "path", r.URL.Path, "uid", cr.UID, "pid", cr.PID, "err", err)
			WriteError(w, err)
			return
		}
		if a == Admin {
			cr, _ := PeerCreds(r.Context())
			log.Debug("api change", "route", pattern, "path", r.URL.Path, "uid", cr.UID, "pid", cr.PID)
		}
		f(w, r)
	})
}

// Routes returns the table of registered routes, in registration order.
func (rt *Router) Routes() []Route {
	return append([]Route(nil), rt.routes...)
}
