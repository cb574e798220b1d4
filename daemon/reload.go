package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
)

// reload re-reads the config file. A bad file changes nothing; a good one is
// applied section by section, and sections that cannot change while running
// are named in the log with what to do.
func (d *Daemon) reload(ctx context.Context) {
	d.opts.Notify("RELOADING=1")
	defer d.opts.Notify("READY=1")
	d.notifyStatus("reloading %s", d.opts.ConfigPath)
	next, err := config.Load(d.opts.ConfigPath)
	if err == nil {
		err = next.Resolve()
	}
	d.mu.Lock()
	d.lastReload = time.Now()
	d.reloads++
	cur := d.cfg
	if err != nil {
		d.reloadError = err.Error()
		d.mu.Unlock()
		d.metrics.Reloads.WithLabelValues("failed").Inc()
		d.log.Error("config reload refused; the running config stays in force", "file", d.opts.ConfigPath, "err", oneLine(err))
		d.notifyStatus("reload refused (bad config, see log); running with the previous config")
		return
	}
	d.reloadError = ""
	d.mu.Unlock()

	changed, restartOnly := diffSections(cur, next)
	if len(changed) == 0 {
		// The reloaders still run: SIGHUP is also how an operator says
		// "re-read policies.d", with the config file untouched.
		for _, a := range d.reloaders {
			if err := a(ctx, cur, next); err != nil {
				d.log.Error("applying reloaded config", "err", err)
			}
		}
		d.log.Info("config reloaded; nothing changed", "file", d.opts.ConfigPath)
		d.metrics.Reloads.WithLabelValues("ok").Inc()
		d.notifyStatus("serving; config unchanged on reload")
		return
	}
	if cur.Log != next.Log && d.opts.Level != nil {
		d.opts.Level.Set(parseLevel(next.Log.Level))
	}
	if cur.Metrics != next.Metrics {
		if err := d.startMetrics(ctx, next.Metrics.Listen); err != nil {
			d.log.Error("metrics listener not moved; keeping none until the next good reload", "err", err)
		}
	}
	for _, a := range d.reloaders {
		if err := a(ctx, cur, next); err != nil {
			d.log.Error("applying reloaded config", "err", err)
		}
	}
	// Keep the parts that need a restart as they run, so status and later
	// diffs describe what is really in force.
	applied := next
	for _, s := range restartOnly {
		copySection(&applied, &cur, s)
	}
	d.mu.Lock()
	d.cfg = applied
	d.mu.Unlock()
	d.metrics.Reloads.WithLabelValues("ok").Inc()
	attrs := []any{"file", d.opts.ConfigPath, "changed", strings.Join(changed, ",")}
	if len(restartOnly) > 0 {
		attrs = append(attrs, "needs_restart", strings.Join(restartOnly, ","))
		d.log.Warn("config reloaded; some sections change only on restart (systemctl restart rackwired)", attrs...)
	} else {
		d.log.Info("config reloaded", attrs...)
	}
	d.notifyStatus("serving; config reloaded (%s)", strings.Join(changed, ","))
}

// reloader applies the difference between two good configs to one component.
type reloader func(ctx context.Context, old, next config.Config) error

// restartSections are the sections that are read once at start.
var restartSections = map[string]bool{"node": true, "agent": true, "store": true, "ipam": true, "restart": false, "docker": true}

func diffSections(a, b config.Config) (changed, restartOnly []string) {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	t := va.Type()
	for i := 0; i < t.NumField(); i++ {
		name := t.Field(i).Tag.Get("toml")
		if name == "-" || name == "" {
			continue
		}
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			changed = append(changed, name)
			if restartSections[name] {
				restartOnly = append(restartOnly, name)
			}
		}
	}
	return changed, restartOnly
}

func copySection(dst, src *config.Config, section string) {
	vd, vs := reflect.ValueOf(dst).Elem(), reflect.ValueOf(src).Elem()
	t := vd.Type()
	for i := 0; i < t.NumField(); i++ {
		if t.Field(i).Tag.Get("toml") == section {
			vd.Field(i).Set(vs.Field(i))
		}
	}
}

func parseLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}

func oneLine(err error) string {
	return strings.ReplaceAll(fmt.Sprint(err), "\n", " | ")
}
