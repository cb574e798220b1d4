// Command rackwire is the operator's CLI for the rackwire agent on this
// host. It talks to rackwired over its unix socket (--socket PATH,
// $RACKWIRE_SOCKET, default /run/rackwire/rackwire.sock). Every table has
// --json; errors go to stderr with a non-zero exit and say what to do.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
