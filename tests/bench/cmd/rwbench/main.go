// Command rwbench measures what the rackwire datapath costs real traffic
// between two endpoints on one host. It is what `make bench` runs (through
// tests/bench/run.sh); nothing else imports it.
//
// `rwbench run` builds a host namespace and two endpoint namespaces with the
// real endpoint manager and the real eBPF datapath, then alternates two
// configurations of the same veths: (a) plain veth + routing, no program
// attached, and (b) rackwire attached, with 1,000 extra identities in the
// ipcache and 10,000 policy entries on the server endpoint. Each round runs
// request/response, connect/request/close and a TCP stream from the client
// namespace to the server namespace, each bounded in time and count; the
// report gives the medians and the ratios b/a against the goals.
//
// `rwbench serve` and `rwbench client` are the two halves of the load, run
// by `run` inside the namespaces (ip netns exec).
//
// Everything it creates is named rwh-bench* (namespaces, pin directory
// /sys/fs/bpf/rwh-bench) and removed on exit, on error and on SIGINT or
// SIGTERM; a run finds and removes leftovers of a killed one before it
// starts. Bad flags are an error before anything is created.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func usage(w io.Writer) {
	fmt.Fprintln(w, `usage: rwbench run [flags]         measure (root; what make bench runs)
       rwbench services [flags]    service VIPs vs direct vs IPVS (root; make bench-services)
       rwbench serve -listen ADDR   load server (run inside a namespace)
       rwbench client               load client: requests on stdin (run inside a namespace)`)
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(ctx, args[1:], stdout, stderr)
	case "services":
		err = cmdServices(ctx, args[1:], stdout, stderr)
	case "serve":
		err = cmdServe(ctx, args[1:], stdout)
	case "client":
		err = cmdClient(ctx, args[1:], os.Stdin, stdout)
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return 0
	default:
		usage(stderr)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "rwbench:", err)
		return 2
	case ctx.Err() != nil:
		if args[0] == "run" { // the load processes end quietly
			fmt.Fprintln(stderr, "rwbench: interrupted; cleaned up")
		}
		return 130
	default:
		fmt.Fprintln(stderr, "rwbench:", err)
		return 1
	}
}

var errUsage = errors.New("bad usage")

// newLogger logs warnings and errors only: the report goes to stdout.
func newLogger(w io.Writer, verbose bool) *slog.Logger {
	lvl := slog.LevelWarn
	if verbose {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lvl}))
}
