// Command rackwire-cni is rackwire's CNI plugin (type "rackwire-cni"): a
// container runtime execs it to plug a container's network namespace into
// rackwired. See internal/cniplugin and docs/containers.md.
package main

import (
	"os"

	"github.com/rackwire/rackwire/internal/cniplugin"
)

func main() { os.Exit(cniplugin.Main()) }
