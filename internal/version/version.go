// Package version carries the build's version, stamped by the linker:
//
//	-ldflags "-X github.com/rackwire/rackwire/internal/version.Version=1.2.3"
package version

import "runtime/debug"

// Version is the release version; "dev" for untagged builds.
var Version = "dev"

// Commit returns the VCS revision recorded by the Go toolchain, if any.
func Commit() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return ""
}
