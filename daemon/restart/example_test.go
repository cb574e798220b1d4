package restart_test

import (
	"fmt"

	"github.com/rackwire/rackwire/daemon/restart"
)

// The table in docs/restart.md.
func ExampleWindowFor() {
	for _, n := range []int{10, 100, 1000, 5000, 20000, 50000} {
		fmt.Printf("%d hosts: %v\n", n, restart.WindowFor(n))
	}
	// Output:
	// 10 hosts: 52s
	// 100 hosts: 4m9s
	// 1000 hosts: 20m0s
	// 5000 hosts: 1h0m0s
	// 20000 hosts: 2h34m34s
	// 50000 hosts: 4h0m0s
}
