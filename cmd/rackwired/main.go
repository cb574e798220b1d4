// Command rackwired is the rackwire agent: one per host, run by systemd.
//
//	rackwired [--config PATH]                run the agent (systemd Type=notify)
//	rackwired check-config [--config PATH]   validate and print the effective config
//	rackwired prestart [--config PATH]       restart jitter + backoff gate (ExecStartPre)
//	rackwired cleanup [--config PATH]        remove the datapath and endpoints
//	rackwired --version
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

	"github.com/BurntSushi/toml"

	"github.com/rackwire/rackwire/daemon"
	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/restart"
	"github.com/rackwire/rackwire/internal/logging"
	"github.com/rackwire/rackwire/internal/version"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

const usage = `usage: rackwired [--config PATH]                run the agent
       rackwired check-config [--config PATH]   validate and print the effective config
       rackwired prestart [--config PATH]       restart gate for ExecStartPre
       rackwired cleanup [--config PATH]        remove the datapath, pins and endpoints
       rackwired --version
`

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("rackwired "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	cfgPath := fs.String("config", config.DefaultPath, "config file")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *showVersion || cmd == "version" {
		fmt.Fprintf(stdout, "rackwired %s\n", version.Version)
		return 0
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "rackwired %s: unexpected argument %q\n%s", cmd, fs.Arg(0), usage)
		return 2
	}
	switch cmd {
	case "run":
		return runAgent(*cfgPath, stderr)
	case "check-config":
		return checkConfig(*cfgPath, stdout, stderr)
	case "prestart":
		return prestart(*cfgPath, stderr)
	case "cleanup":
		return cleanup(*cfgPath, stderr)
	default:
		fmt.Fprintf(stderr, "rackwired: unknown command %q\n%s", cmd, usage)
		return 2
	}
}

func loadConfig(path string) (config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return cfg, err
	}
	if err := cfg.Resolve(); err != nil {
		return config.Config{}, err
	}
	return cfg, nil
}

func checkConfig(path string, stdout, stderr io.Writer) int {
	cfg, err := loadConfig(path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "# %s is valid; effective config with defaults filled in:\n", path)
	enc := toml.NewEncoder(stdout)
	enc.Indent = ""
	if err := enc.Encode(cfg); err != nil {
		fmt.Fprintln(stderr, "print config:", err)
		return 1
	}
	return 0
}

func runAgent(path string, stderr io.Writer) int {
	lv := new(slog.LevelVar)
	cfg, err := loadConfig(path)
	if err != nil {
		// No config, no configured format: log the way systemd reads best.
		log := logging.New(stderr, "auto", lv)
		log.Error("cannot start: bad config; fix it and check it with `rackwired check-config`", "file", path, "err", err.Error())
		return 1
	}
	lv.Set(logging.ParseLevel(cfg.Log.Level))
	log := logging.New(stderr, cfg.Log.Format, lv)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := daemon.New(ctx, cfg, log, daemon.Options{ConfigPath: path, Level: lv})
	if err != nil {
		log.Error("cannot start", "err", err.Error())
		return 1
	}
	defer d.Close()
	// The daemon handles SIGTERM itself (STOPPING=1); restore default
	// delivery so it sees them.
	stop()
	if err := d.Run(context.Background()); err != nil {
		log.Error("agent failed", "err", err.Error())
		return 1
	}
	return 0
}

func prestart(path string, stderr io.Writer) int {
	lv := new(slog.LevelVar)
	cfg, err := loadConfig(path)
	log := logging.New(stderr, "auto", lv)
	if err != nil {
		// A bad config must not wedge the start in the gate: let the
		// agent start and report the config error itself.
		log.Error("prestart: config does not load; not delaying, the agent will report the error", "file", path, "err", err.Error())
		return 0
	}
	log = logging.New(stderr, cfg.Log.Format, lv)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := os.MkdirAll(cfg.Agent.StateDir, 0o755); err != nil {
		log.Warn("prestart: cannot create the state directory; deciding without state", "dir", cfg.Agent.StateDir, "err", err.Error())
	}
	g := &restart.Gate{Dir: cfg.Agent.StateDir, Cfg: cfg.Restart, Log: log.With("subsys", "prestart")}
	if _, err := g.Run(ctx); err != nil && ctx.Err() == nil {
		log.Error("prestart gate failed; starting anyway", "err", err.Error())
	}
	return 0
}

func cleanup(path string, stderr io.Writer) int {
	lv := new(slog.LevelVar)
	log := logging.New(stderr, "auto", lv)
	cfg, err := loadConfig(path)
	if err != nil {
		log.Warn("config does not load; cleaning up the default paths", "err", err.Error())
		cfg = config.Default()
	}
	if err := daemon.Cleanup(context.Background(), cfg, log); err != nil {
		log.Error("cleanup failed", "err", err.Error())
		return 1
	}
	return 0
}
