package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/version"
)

// env is what every command gets.
type env struct {
	ctx    context.Context
	client *api.Client
	stdout io.Writer
	stderr io.Writer
	json   bool
}

// command is a node of the command tree.
type command struct {
	name    string
	summary string
	usage   string // arguments, for help
	flags   func(fs *flag.FlagSet)
	run     func(e *env, fs *flag.FlagSet) error
	subs    []*command
}

// usageError is a mistake on the command line (exit 2).
type usageError struct{ msg string }

func (u usageError) Error() string { return u.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

var commands []*command

func register(c *command) { commands = append(commands, c) }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := &command{name: "rackwire", subs: commands}
	socket := ""
	// Global flags may precede the command.
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		switch {
		case args[0] == "--version" || args[0] == "-version":
			fmt.Fprintf(stdout, "rackwire %s\n", version.Version)
			return 0
		case args[0] == "-h" || args[0] == "--help" || args[0] == "-help":
			printHelp(stdout, root, nil)
			return 0
		case strings.HasPrefix(args[0], "--socket="):
			socket = strings.TrimPrefix(args[0], "--socket=")
			args = args[1:]
		case (args[0] == "--socket" || args[0] == "-socket") && len(args) > 1:
			socket, args = args[1], args[2:]
		default:
			fmt.Fprintf(stderr, "rackwire: unknown global flag %s\n", args[0])
			return 2
		}
	}
	cmd, path, rest := root, []string{}, args
	for len(rest) > 0 && len(cmd.subs) > 0 {
		next := find(cmd.subs, rest[0])
		if next == nil {
			if rest[0] == "help" || rest[0] == "-h" || rest[0] == "--help" || rest[0] == "-help" {
				printHelp(stdout, cmd, path)
				return 0
			}
			fmt.Fprintf(stderr, "rackwire: unknown command %q\n", strings.Join(append(path, rest[0]), " "))
			printHelp(stderr, cmd, path)
			return 2
		}
		cmd, path, rest = next, append(path, next.name), rest[1:]
	}
	if cmd.run == nil {
		printHelp(stderr, cmd, path)
		return 2
	}
	fs := flag.NewFlagSet("rackwire "+strings.Join(path, " "), flag.ContinueOnError)
	fs.SetOutput(stderr)
	jsonOut := fs.Bool("json", false, "print JSON instead of a table")
	fs.StringVar(&socket, "socket", socket, "agent socket (default $RACKWIRE_SOCKET or "+api.DefaultSocket+")")
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: rackwire %s %s\n  %s\n\nflags:\n", strings.Join(path, " "), cmd.usage, cmd.summary)
		fs.PrintDefaults()
	}
	if err := fs.Parse(interleave(rest, fs)); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	e := &env{ctx: ctx, client: api.NewClient(socket), stdout: stdout, stderr: stderr, json: *jsonOut}
	if err := cmd.run(e, fs); err != nil {
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "rackwire %s: %s\n", strings.Join(path, " "), ue.msg)
			fs.Usage()
			return 2
		}
		var ae *api.Error
		if errors.As(err, &ae) && ae.Code == http.StatusForbidden {
			// Refused by the agent's access check (docs/security.md): what
			// was refused, then on its own line what to do.
			fmt.Fprintf(stderr, "rackwire %s: %s\n", strings.Join(path, " "), ae.ErrorBody.Error)
			if ae.Hint != "" {
				fmt.Fprintf(stderr, "rackwire %s: %s\n", strings.Join(path, " "), ae.Hint)
			}
			return 1
		}
		fmt.Fprintf(stderr, "rackwire %s: %s\n", strings.Join(path, " "), err)
		return 1
	}
	return 0
}

// interleave lets flags follow positional arguments ("get web --json").
func interleave(args []string, fs *flag.FlagSet) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if strings.HasPrefix(a, "-") && len(a) > 1 {
			flags = append(flags, a)
			name := strings.TrimLeft(a, "-")
			if strings.Contains(name, "=") {
				continue
			}
			if f := fs.Lookup(name); f != nil {
				if bf, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && bf.IsBoolFlag() {
					continue
				}
				if i+1 < len(args) {
					flags = append(flags, args[i+1])
					i++
				}
			}
			continue
		}
		pos = append(pos, a)
	}
	return append(flags, pos...)
}

func find(cs []*command, name string) *command {
	for _, c := range cs {
		if c.name == name {
			return c
		}
	}
	return nil
}

func printHelp(w io.Writer, c *command, path []string) {
	prefix := strings.TrimSpace("rackwire " + strings.Join(path, " "))
	fmt.Fprintf(w, "usage: %s <command> [flags]\n\ncommands:\n", prefix)
	subs := append([]*command(nil), c.subs...)
	sort.Slice(subs, func(i, j int) bool { return subs[i].name < subs[j].name })
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	for _, s := range subs {
		fmt.Fprintf(tw, "  %s\t%s\n", s.name, s.summary)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nGlobal flags: --socket PATH (or $RACKWIRE_SOCKET), --json on every table, --version.\n")
}

// printJSON writes v indented.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes rows aligned; the first row is the header.
func table(w io.Writer, rows [][]string) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

func (e *env) get(path string, out any) error {
	ctx, cancel := context.WithTimeout(e.ctx, api.Timeout)
	defer cancel()
	return e.client.Do(ctx, "GET", path, nil, out)
}

func (e *env) call(method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(e.ctx, api.Timeout)
	defer cancel()
	return e.client.Do(ctx, method, path, in, out)
}
