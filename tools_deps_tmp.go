package rackwire
import (
 _ "github.com/cilium/ebpf"
 _ "github.com/vishvananda/netlink"
 _ "github.com/hashicorp/consul/api"
 _ "github.com/BurntSushi/toml"
 _ "github.com/coreos/go-systemd/v22/daemon"
 _ "github.com/prometheus/client_golang/prometheus"
 _ "go.etcd.io/bbolt"
 _ "sigs.k8s.io/yaml"
 _ "github.com/google/go-cmp/cmp"
 _ "golang.org/x/sys/unix"
)

