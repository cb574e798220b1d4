package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/service"
)

// The services benchmark (`rwbench services`, `make bench-services`): a
// client namespace and a server namespace routed through a host
// namespace; the client process runs in a private cgroup-v2 child to
// which the socket load balancer is attached. In one run, interleaved:
//
//	direct:  the client connects to the server's address
//	vip:     the client connects to a VIP with the server as its one
//	         backend, one service programmed
//	vip10k:  the same VIP among 10,000 programmed services
//	ipvs:    the same service in IPVS (ipvsadm, NAT mode) in the host
//	         namespace, where the kernel has IPVS
//	nft:     the same service as an nftables DNAT rule in the host
//	         namespace (numgen over a backend map, as kube-proxy's
//	         nftables mode writes it): the alternative an operator has
//	         where the kernel has no IPVS
//
// Names: rwsd-bench-* namespaces, /sys/fs/bpf/rwsd-bench, cgroup
// rwsd-bench under the cgroup2 mount; removed on exit and before a run.
const (
	svcHostNS, svcClientNS, svcServerNS = "rwsd-bench-h", "rwsd-bench-c", "rwsd-bench-s"
	svcPinDir                           = "/sys/fs/bpf/rwsd-bench"
	svcBackendPort                      = 8080
)

var (
	svcServerIP = netip.MustParseAddr("10.213.2.2")
	svcVIP      = netip.MustParseAddrPort("10.96.213.1:80")
	svcIPVSVIP  = netip.MustParseAddrPort("10.96.214.1:80")
	svcNftVIP   = netip.MustParseAddrPort("10.96.215.1:80")
)

func cgroup2Mount() (string, error) {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("no cgroup2 mount (mount -t cgroup2 none /sys/fs/cgroup/unified)")
}

func svcSweep(cg string) error {
	var errs []error
	for _, ns := range []string{svcHostNS, svcClientNS, svcServerNS} {
		if _, err := os.Stat(nsPath(ns)); err == nil {
			errs = append(errs, ip("netns", "del", ns))
		}
	}
	errs = append(errs, datapath.Cleanup(svcPinDir))
	if cg != "" {
		if err := os.Remove(cg); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func svcTable(n int) service.Table {
	var t service.Table
	t.Services = append(t.Services, service.Service{Name: "bench", Frontend: service.Frontend{VIP: svcVIP.Addr(), Port: svcVIP.Port(), Proto: service.TCP},
		Backends: []service.Backend{{Addr: svcServerIP, Port: svcBackendPort, State: service.StateActive}}})
	for i := 1; i < n; i++ {
		vip := netip.AddrFrom4([4]byte{10, 97, byte(i / 256), byte(i % 256)})
		s := service.Service{Name: fmt.Sprintf("filler%d", i), Frontend: service.Frontend{VIP: vip, Port: 80, Proto: service.TCP}}
		for b := range 3 {
			s.Backends = append(s.Backends, service.Backend{Addr: netip.AddrFrom4([4]byte{10, 98, byte(i / 256), byte(i % 256)}), Port: uint16(8000 + b), State: service.StateActive})
		}
		t.Services = append(t.Services, s)
	}
	return t
}

type svcClient struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *json.Decoder
}

func (c *svcClient) load(ctx context.Context, kind string, addr netip.AddrPort, dur time.Duration, maxOps int64) (result, error) {
	if err := ctx.Err(); err != nil {
		return result{}, err
	}
	if err := json.NewEncoder(c.in).Encode(request{Kind: kind, Addr: addr.String(), Dur: dur, Max: maxOps}); err != nil {
		return result{}, fmt.Errorf("client: send request: %w", err)
	}
	var r result
	if err := c.out.Decode(&r); err != nil {
		return result{}, fmt.Errorf("client: read result: %w", err)
	}
	if r.Error != "" {
		return result{}, fmt.Errorf("client %s to %s: %s", kind, addr, r.Error)
	}
	return r, nil
}

func cmdServices(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("services", flag.ContinueOnError)
	fs.SetOutput(stderr)
	rounds := fs.Int("rounds", 11, "rounds (medians over these); at least 3")
	dur := fs.Duration("dur", time.Second, "duration of each measurement")
	quick := fs.Bool("quick", false, "3 rounds of 200ms")
	verbose := fs.Bool("v", false, "log the datapath steps")
	many := fs.Int("services", 10000, "services of the large table (vip10k)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if *quick {
		*rounds, *dur = 3, 200*time.Millisecond
	}
	if *rounds < 3 || *dur < 100*time.Millisecond || *dur > time.Minute || *many < 2 || *many > 16000 {
		return fmt.Errorf("%w: want -rounds >= 3, 100ms <= -dur <= 1m and 2 <= -services <= 16000", errUsage)
	}
	if os.Geteuid() != 0 {
		return errors.New("the benchmark creates namespaces, cgroups and loads BPF programs: run it as root")
	}
	log := newLogger(stderr, *verbose)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	root, err := cgroup2Mount()
	if err != nil {
		return err
	}
	cg := filepath.Join(root, "rwsd-bench")
	if err := svcSweep(cg); err != nil {
		return fmt.Errorf("remove leftovers: %w", err)
	}
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			stopProcess(p)
		}
		if cerr := svcSweep(cg); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	for _, ns := range []string{svcHostNS, svcClientNS, svcServerNS} {
		if err := ip("netns", "add", ns); err != nil {
			return err
		}
	}
	for _, s := range []struct{ ns, hostIf, subnet string }{{svcClientNS, "rwsd-bh-c", "10.213.1"}, {svcServerNS, "rwsd-bh-s", "10.213.2"}} {
		for _, a := range [][]string{
			{"-n", svcHostNS, "link", "add", s.hostIf, "type", "veth", "peer", "name", "eth0", "netns", s.ns},
			{"-n", svcHostNS, "addr", "add", s.subnet + ".1/24", "dev", s.hostIf},
			{"-n", svcHostNS, "link", "set", s.hostIf, "up"},
			{"-n", s.ns, "addr", "add", s.subnet + ".2/24", "dev", "eth0"},
			{"-n", s.ns, "link", "set", "eth0", "up"},
			{"-n", s.ns, "link", "set", "lo", "up"},
			{"-n", s.ns, "route", "add", "default", "via", s.subnet + ".1"},
		} {
			if err := ip(a...); err != nil {
				return err
			}
		}
	}
	if err := command("ip", "netns", "exec", svcHostNS, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		return err
	}
	// The client reuses its TIME_WAIT ports (timestamps make that safe):
	// thousands of connections a second to one backend exhaust the
	// ephemeral ports of that 4-tuple space, and "direct" and "vip" share
	// it (the VIP is translated at connect time) while the DNAT modes
	// (nft, ipvs) each have their own, which made them look 10x faster.
	if err := command("ip", "netns", "exec", svcClientNS, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"); err != nil {
		return err
	}
	if err := os.Mkdir(cg, 0o755); err != nil {
		return fmt.Errorf("create cgroup %s: %w", cg, err)
	}
	d, err := datapath.Open(datapath.Options{PinDir: svcPinDir, ServiceCgroup: cg, ServiceMaxEntries: 16384,
		CTMaxEntries: 16384, IPCacheMaxEntries: 16384, PolicyMaxEntries: 1024}, log)
	if err != nil {
		return err
	}
	defer d.Close()

	ipvs := "ipvs"
	ipvsWhy := ""
	if _, err := exec.LookPath("ipvsadm"); err != nil {
		ipvsWhy = "ipvsadm not installed (make deps)"
	} else if err := command("ip", "netns", "exec", svcHostNS, "ipvsadm", "-A", "-t", svcIPVSVIP.String(), "-s", "rr"); err != nil {
		ipvsWhy = "this kernel has no IPVS: " + strings.ReplaceAll(err.Error(), "\n", " ")
	} else {
		for _, a := range [][]string{
			{"netns", "exec", svcHostNS, "ipvsadm", "-a", "-t", svcIPVSVIP.String(), "-r", netip.AddrPortFrom(svcServerIP, svcBackendPort).String(), "-m"},
			{"-n", svcHostNS, "addr", "add", svcIPVSVIP.Addr().String() + "/32", "dev", "lo"},
			{"-n", svcHostNS, "link", "set", "lo", "up"},
		} {
			if err := command("ip", a...); err != nil {
				return err
			}
		}
	}

	nft, nftWhy := "nft", ""
	if _, err := exec.LookPath("nft"); err != nil {
		nftWhy = "nft not installed (make deps)"
	} else if err := nftDNAT(svcNftVIP, netip.AddrPortFrom(svcServerIP, svcBackendPort)); err != nil {
		nftWhy = strings.ReplaceAll(err.Error(), "\n", " ")
	}

	srv := exec.Command("ip", "netns", "exec", svcServerNS, self, "serve", "-listen", netip.AddrPortFrom(svcServerIP, svcBackendPort).String())
	srv.Env, srv.Stderr = loadEnv(), stderr
	srv.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	srvOut, err := srv.StdoutPipe()
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return fmt.Errorf("start server: %w", err)
	}
	procs = append(procs, srv)
	if line, err := bufio.NewReader(srvOut).ReadString('\n'); err != nil || strings.TrimSpace(line) != "ready" {
		return fmt.Errorf("server not ready: %q %v", line, err)
	}
	// The client joins the cgroup before it makes any socket (and before
	// ip netns exec, which mounts another /sys).
	cli := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" "$3" client`, "sh", cg, svcClientNS, self)
	cli.Env, cli.Stderr = loadEnv(), stderr
	cli.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cli.StdinPipe()
	if err != nil {
		return err
	}
	out, err := cli.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cli.Start(); err != nil {
		return fmt.Errorf("start client: %w", err)
	}
	procs = append(procs, cli)
	c := &svcClient{cmd: cli, in: in, out: json.NewDecoder(out)}
	defer in.Close()

	small, big := svcTable(1), svcTable(*many)
	start := time.Now()
	if err := d.SyncServices(small); err != nil {
		return err
	}
	direct := netip.AddrPortFrom(svcServerIP, svcBackendPort)
	configs := []struct {
		name string
		addr netip.AddrPort
	}{{"direct", direct}, {"vip", svcVIP}}
	if ipvsWhy == "" {
		configs = append(configs, struct {
			name string
			addr netip.AddrPort
		}{ipvs, svcIPVSVIP})
	}
	if nftWhy == "" {
		configs = append(configs, struct {
			name string
			addr netip.AddrPort
		}{nft, svcNftVIP})
	}
	// Check every path works before measuring, and that the VIP really is
	// translated (the server counts connections by the address it sees).
	for _, cf := range configs {
		if r, err := c.load(ctx, kindCRR, cf.addr, 100*time.Millisecond, 100); err != nil || r.Ops == 0 {
			return fmt.Errorf("%s (%s) does not work: %v", cf.name, cf.addr, err)
		}
	}
	t0 := time.Now()
	if err := d.SyncServices(big); err != nil {
		return err
	}
	syncBig := time.Since(t0)
	t0 = time.Now()
	if err := d.SyncServices(small); err != nil {
		return err
	}
	syncSmall := time.Since(t0)

	fmt.Fprintf(stdout, "rackwire services benchmark: %d rounds, %v per measurement, interleaved\n", *rounds, *dur)
	fmt.Fprintf(stdout, "client %s (in cgroup %s) -> host namespace -> server %s; VIP %s with the server as its backend\n", "10.213.1.2", cg, direct, svcVIP)
	fmt.Fprintf(stdout, "  direct: to the server's address; vip: to the VIP, 1 service; vip10k: to the VIP among %d services (3 backends each)\n", *many)
	if ipvsWhy == "" {
		fmt.Fprintf(stdout, "  ipvs: IPVS NAT mode in the host namespace, VIP %s\n", svcIPVSVIP)
	} else {
		fmt.Fprintf(stdout, "  ipvs: NOT MEASURED: %s\n", ipvsWhy)
	}
	if nftWhy == "" {
		fmt.Fprintf(stdout, "  nft: an nftables DNAT rule (numgen over a backend map) in the host namespace, VIP %s\n", svcNftVIP)
	} else {
		fmt.Fprintf(stdout, "  nft: NOT MEASURED: %s\n", nftWhy)
	}
	fmt.Fprintf(stdout, "SyncServices: %d services %v, back to 1 service %v\n\n", *many, syncBig.Round(time.Millisecond), syncSmall.Round(time.Millisecond))

	rates := map[string]map[string][]float64{} // kind -> config -> per round
	add := func(kind, name string, r result) {
		if rates[kind] == nil {
			rates[kind] = map[string][]float64{}
		}
		rates[kind][name] = append(rates[kind][name], r.rate())
	}
	kinds := []string{kindCRR, kindRR}
	for round := range *rounds {
		// One service: direct, vip, ipvs, nft in rotating order.
		for _, kind := range kinds {
			for j := range configs {
				cf := configs[(j+round)%len(configs)]
				r, err := c.load(ctx, kind, cf.addr, *dur, map[string]int64{kindCRR: maxCRR, kindRR: maxRR}[kind])
				if err != nil {
					return err
				}
				add(kind, cf.name, r)
			}
		}
		// 10,000 services: the VIP again, and direct once more as the
		// baseline of this half of the round.
		if err := d.SyncServices(big); err != nil {
			return err
		}
		for _, kind := range kinds {
			for _, cf := range []struct {
				name string
				addr netip.AddrPort
			}{{"vip10k", svcVIP}, {"direct10k", direct}} {
				r, err := c.load(ctx, kind, cf.addr, *dur, map[string]int64{kindCRR: maxCRR, kindRR: maxRR}[kind])
				if err != nil {
					return err
				}
				add(kind, cf.name, r)
			}
		}
		if err := d.SyncServices(small); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "round %d/%d done\n", round+1, *rounds)
	}
	for _, kind := range kinds {
		label := map[string]string{kindCRR: "connect/request/close (conn/s)", kindRR: "request/response, 1 B, one connection (trans/s)"}[kind]
		fmt.Fprintf(stdout, "%s\n", label)
		for _, name := range []string{"direct", "vip", ipvs, nft, "direct10k", "vip10k"} {
			if xs := rates[kind][name]; len(xs) > 0 {
				fmt.Fprintf(stdout, "  %-10s median %10.0f  (p10 %.0f, p90 %.0f)\n", name, median(xs), quantile(xs, 0.1), quantile(xs, 0.9))
			}
		}
		ratio := func(a, b string) float64 {
			var rs []float64
			for i := range rates[kind][a] {
				if i < len(rates[kind][b]) && rates[kind][b][i] > 0 {
					rs = append(rs, rates[kind][a][i]/rates[kind][b][i])
				}
			}
			return median(rs)
		}
		fmt.Fprintf(stdout, "  vip / direct            %.3f (goal >= 0.95) %s\n", ratio("vip", "direct"), verdict(ratio("vip", "direct"), 0.95))
		cost := 1 / (ratio("vip10k", "direct10k") / ratio("vip", "direct"))
		fmt.Fprintf(stdout, "  cost large / 1 service  %.3f (per-connection cost, each against its direct baseline; goal <= 1.05) %s\n", cost, verdict(1/cost, 1/1.05))
		if ipvsWhy == "" {
			fmt.Fprintf(stdout, "  vip / ipvs              %.3f (goal >= 1.0) %s\n", ratio("vip", ipvs), verdict(ratio("vip", ipvs), 1.0))
		}
		if nftWhy == "" {
			fmt.Fprintf(stdout, "  vip / nft               %.3f (goal >= 1.0) %s\n", ratio("vip", nft), verdict(ratio("vip", nft), 1.0))
		}
		fmt.Fprintln(stdout)
	}
	fmt.Fprintf(stdout, "services benchmark took %v\n", time.Since(start).Round(time.Second))
	return nil
}

// nftDNAT writes the nftables equivalent of a one-backend service in the
// host namespace: a destination NAT in prerouting choosing among the
// backends with numgen, the rule kube-proxy's nftables mode generates.
func nftDNAT(vip, backend netip.AddrPort) error {
	rules := fmt.Sprintf(`table ip rwsd_bench {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr %s tcp dport %d dnat ip to numgen random mod 1 map { 0 : %s . %d }
	}
}
`, vip.Addr(), vip.Port(), backend.Addr(), backend.Port())
	cmd := exec.Command("ip", "netns", "exec", svcHostNS, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s", svcHostNS, err, out)
	}
	return nil
}
