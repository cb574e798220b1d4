package birdconf

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrNotRunning means nothing listens on the control socket: BIRD is not
// running, or runs with another socket path.
var ErrNotRunning = errors.New("BIRD is not running")

// ErrRefused means BIRD answered a request with an error code (8xxx, 9xxx).
var ErrRefused = errors.New("BIRD refused the request")

// Line is one reply line from BIRD's control socket.
type Line struct {
	// Code is the 4-digit reply code; a continuation line carries the code
	// of the line it continues. Spontaneous ("+") lines are not returned.
	Code int
	Text string
}

// Client speaks BIRD's control-socket protocol. It opens one connection
// per request, so it holds no state and is safe for concurrent use.
type Client struct {
	// Socket is the path of BIRD's control socket (bird -s).
	Socket string
	// Timeout bounds one request when the context has no deadline
	// (default 10s).
	Timeout time.Duration
}

// Reply is BIRD's answer to one request.
type Reply []Line

// Err returns the reply's error, if its last line carries an error code.
func (r Reply) Err() error {
	if len(r) == 0 {
		return fmt.Errorf("%w: empty reply", ErrRefused)
	}
	last := r[len(r)-1]
	if last.Code >= 8000 {
		return fmt.Errorf("%w: %04d %s", ErrRefused, last.Code, last.Text)
	}
	return nil
}

// Request sends one command line and returns the reply lines. It stops at
// the first line whose fifth character is a space (the last line of a
// reply), so commands that end with a code other than 0000 do not hang.
func (c *Client) Request(ctx context.Context, cmd string) (Reply, error) {
	if strings.ContainsAny(cmd, "\r\n") {
		return nil, fmt.Errorf("bird request %q: contains a line break", cmd)
	}
	if _, ok := ctx.Deadline(); !ok {
		t := c.Timeout
		if t <= 0 {
			t = 10 * time.Second
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t)
		defer cancel()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Socket)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w: no BIRD listens on %s (start bird, or fix [bgp] bird_socket): %v", ErrNotRunning, c.Socket, err)
		}
		return nil, fmt.Errorf("connect to BIRD at %s: %w", c.Socket, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	r := bufio.NewReader(conn)
	// BIRD greets every connection with "0001 BIRD x.y ready.".
	if _, err := readReply(r); err != nil {
		return nil, c.ioErr(ctx, "read BIRD greeting", err)
	}
	if _, err := conn.Write([]byte(cmd + "\n")); err != nil {
		return nil, c.ioErr(ctx, "send "+cmd, err)
	}
	rep, err := readReply(r)
	if err != nil {
		return nil, c.ioErr(ctx, "read reply to "+cmd, err)
	}
	return rep, nil
}

func (c *Client) ioErr(ctx context.Context, step string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s on %s: %w", step, c.Socket, ctx.Err())
	}
	return fmt.Errorf("%s on %s: %w", step, c.Socket, err)
}

// maxReplySize bounds one reply. The replies the agent reads (configure,
// show protocols [all], show bfd sessions) are a few KiB per protocol; a
// peer that sends more, or a line that never ends, is cut off with an
// error instead of being read into memory until the request times out.
const maxReplySize = 16 << 20

var errReplyTooLong = fmt.Errorf("reply longer than %d bytes", maxReplySize)

// readReply reads the lines of one reply, at most maxReplySize bytes.
func readReply(r *bufio.Reader) (Reply, error) {
	var out Reply
	code := 0
	budget := maxReplySize
	for {
		s, err := readLine(r, &budget)
		if errors.Is(err, errReplyTooLong) {
			return out, fmt.Errorf("%w after %d lines", err, len(out))
		}
		if err != nil {
			return out, fmt.Errorf("reply cut short after %d lines: %w", len(out), err)
		}
		s = strings.TrimRight(s, "\r\n")
		switch {
		case strings.HasPrefix(s, "+"):
			// Spontaneous message (e.g. after "echo"); not part of the reply.
			continue
		case strings.HasPrefix(s, " "):
			out = append(out, Line{Code: code, Text: s[1:]})
			continue
		}
		if len(s) < 5 || !isDigits(s[:4]) || (s[4] != '-' && s[4] != ' ') {
			return out, fmt.Errorf("malformed reply line %q", s)
		}
		code, _ = strconv.Atoi(s[:4])
		out = append(out, Line{Code: code, Text: s[5:]})
		if s[4] == ' ' {
			return out, nil
		}
	}
}

// readLine reads one line, '\n' included, and takes its length from
// *budget; a line that would overdraw it is errReplyTooLong.
func readLine(r *bufio.Reader, budget *int) (string, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if *budget -= len(frag); *budget < 0 {
			return "", errReplyTooLong
		}
		line = append(line, frag...)
		if err == nil {
			return string(line), nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return "", err
		}
	}
}

func isDigits(s string) bool {
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// quote writes a BIRD CLI string argument.
func quote(s string) (string, error) {
	if strings.ContainsAny(s, "\"\\\n\r") {
		return "", fmt.Errorf("%q cannot be quoted for BIRD", s)
	}
	return `"` + s + `"`, nil
}

// Configure makes BIRD re-read the configuration file it was started with.
// BIRD's own reply (for a refused file: the file, line and reason) is in
// the error, which wraps ErrRefused.
func (c *Client) Configure(ctx context.Context) error {
	rep, err := c.Request(ctx, "configure")
	if err != nil {
		return err
	}
	if err := rep.Err(); err != nil {
		return fmt.Errorf("configure: %w", err)
	}
	switch last := rep[len(rep)-1]; last.Code {
	case 3, 4, 5, 18, 19: // reconfigured, in progress, queued, confirmed, nothing to do
		return nil
	default:
		return fmt.Errorf("configure: unexpected reply %04d %s", last.Code, last.Text)
	}
}

// ConfigureCheck asks the running BIRD to parse file without applying it
// (reply 0020).
func (c *Client) ConfigureCheck(ctx context.Context, file string) error {
	q, err := quote(file)
	if err != nil {
		return fmt.Errorf("configure check: %w", err)
	}
	rep, err := c.Request(ctx, "configure check "+q)
	if err != nil {
		return err
	}
	if err := rep.Err(); err != nil {
		return fmt.Errorf("configure check %s: %w", file, err)
	}
	if last := rep[len(rep)-1]; last.Code != 20 {
		return fmt.Errorf("configure check %s: unexpected reply %04d %s", file, last.Code, last.Text)
	}
	return nil
}

// Protocol is one line of "show protocols".
type Protocol struct {
	Name  string `json:"name"`
	Proto string `json:"proto"` // BGP, Static, Kernel, Device, BFD
	Table string `json:"table"`
	State string `json:"state"` // up, down, start, flush
	// Since is when the state last changed (zero when BIRD prints a format
	// this parser does not know; SinceText has it verbatim).
	Since     time.Time `json:"since"`
	SinceText string    `json:"since_text"`
	Info      string    `json:"info"` // for BGP: Established, Active, Connect...
}

var (
	reDate = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}$`)
	reTime = regexp.MustCompile(`^\d{2}:\d{2}:\d{2}(\.\d+)?$`)
)

// parseProtocolLine parses "name proto table state since [info]".
func parseProtocolLine(s string) (Protocol, bool) {
	f := strings.Fields(s)
	if len(f) < 5 {
		return Protocol{}, false
	}
	p := Protocol{Name: f[0], Proto: f[1], Table: f[2], State: f[3]}
	rest := f[4:]
	switch {
	case len(rest) >= 2 && reDate.MatchString(rest[0]) && reTime.MatchString(rest[1]):
		p.SinceText = rest[0] + " " + rest[1]
		p.Since, _ = time.ParseInLocation("2006-01-02 15:04:05", strings.SplitN(p.SinceText, ".", 2)[0], time.Local)
		rest = rest[2:]
	case reDate.MatchString(rest[0]):
		p.SinceText = rest[0]
		p.Since, _ = time.ParseInLocation("2006-01-02", rest[0], time.Local)
		rest = rest[1:]
	default:
		p.SinceText = rest[0]
		rest = rest[1:]
	}
	p.Info = strings.Join(rest, " ")
	return p, true
}

// ShowProtocols lists every protocol with its state.
func (c *Client) ShowProtocols(ctx context.Context) ([]Protocol, error) {
	rep, err := c.Request(ctx, "show protocols")
	if err != nil {
		return nil, err
	}
	if err := rep.Err(); err != nil {
		return nil, fmt.Errorf("show protocols: %w", err)
	}
	var out []Protocol
	for _, l := range rep {
		if l.Code != 1002 {
			continue
		}
		if p, ok := parseProtocolLine(l.Text); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

// ProtocolDetail is what "show protocols all NAME" adds to Protocol.
type ProtocolDetail struct {
	Protocol
	BGPState       string `json:"bgp_state,omitempty"`
	NeighborAddr   string `json:"neighbor_address,omitempty"`
	NeighborAS     uint32 `json:"neighbor_as,omitempty"`
	LastError      string `json:"last_error,omitempty"`
	RoutesImported int    `json:"routes_imported"`
	RoutesExported int    `json:"routes_exported"`
	RoutesFiltered int    `json:"routes_filtered"`
	// Channels maps a channel (ipv4, ipv6) to its state (UP, DOWN...).
	Channels map[string]string `json:"channels,omitempty"`
}

var reRoutes = regexp.MustCompile(`(\d+) (imported|exported|filtered|preferred)`)

// ShowProtocolsAll returns the details of one protocol.
func (c *Client) ShowProtocolsAll(ctx context.Context, name string) (ProtocolDetail, error) {
	if !validName(name) {
		return ProtocolDetail{}, fmt.Errorf("show protocols all: %q is not a protocol name", name)
	}
	rep, err := c.Request(ctx, "show protocols all "+name)
	if err != nil {
		return ProtocolDetail{}, err
	}
	if err := rep.Err(); err != nil {
		return ProtocolDetail{}, fmt.Errorf("show protocols all %s: %w", name, err)
	}
	return parseProtocolDetail(rep)
}

func parseProtocolDetail(rep Reply) (ProtocolDetail, error) {
	var d ProtocolDetail
	found := false
	channel := ""
	for _, l := range rep {
		switch l.Code {
		case 1002:
			if p, ok := parseProtocolLine(l.Text); ok {
				d.Protocol, found = p, true
			}
			continue
		case 1006:
		default:
			continue
		}
		key, val, ok := strings.Cut(strings.TrimSpace(l.Text), ":")
		val = strings.TrimSpace(val)
		if !ok {
			if ch, ok := strings.CutPrefix(strings.TrimSpace(l.Text), "Channel "); ok {
				channel = ch
				if d.Channels == nil {
					d.Channels = map[string]string{}
				}
				d.Channels[channel] = ""
			}
			continue
		}
		switch key {
		case "BGP state":
			d.BGPState = val
		case "Neighbor address":
			d.NeighborAddr = val
		case "Neighbor AS":
			v, _ := strconv.ParseUint(val, 10, 32)
			d.NeighborAS = uint32(v)
		case "Last error":
			d.LastError = val
		case "State":
			if channel != "" {
				d.Channels[channel] = val
			}
		case "Routes":
			for _, m := range reRoutes.FindAllStringSubmatch(val, -1) {
				n, _ := strconv.Atoi(m[1])
				switch m[2] {
				case "imported":
					d.RoutesImported += n
				case "exported":
					d.RoutesExported += n
				case "filtered":
					d.RoutesFiltered += n
				}
			}
		}
	}
	if !found {
		return d, errors.New("show protocols all: no protocol line in the reply")
	}
	return d, nil
}

// BFDSession is one line of "show bfd sessions".
type BFDSession struct {
	Protocol  string        `json:"protocol"`
	Address   netip.Addr    `json:"address"`
	Interface string        `json:"interface"`
	State     string        `json:"state"` // Up, Down, Init, AdminDown
	Since     string        `json:"since"`
	Interval  time.Duration `json:"interval_ns"`
	Timeout   time.Duration `json:"timeout_ns"`
}

// ShowBFDSessions lists the BFD sessions of every BFD protocol.
func (c *Client) ShowBFDSessions(ctx context.Context) ([]BFDSession, error) {
	rep, err := c.Request(ctx, "show bfd sessions")
	if err != nil {
		return nil, err
	}
	if err := rep.Err(); err != nil {
		return nil, fmt.Errorf("show bfd sessions: %w", err)
	}
	return parseBFDSessions(rep), nil
}

func parseBFDSessions(rep Reply) []BFDSession {
	var out []BFDSession
	proto := ""
	for _, l := range rep {
		if l.Code != 1020 {
			continue
		}
		t := strings.TrimSpace(l.Text)
		if name, ok := strings.CutSuffix(t, ":"); ok && !strings.Contains(name, " ") {
			proto = name
			continue
		}
		f := strings.Fields(t)
		if len(f) < 6 {
			continue
		}
		a, err := netip.ParseAddr(f[0])
		if err != nil {
			continue // the header line
		}
		s := BFDSession{Protocol: proto, Address: a, Interface: f[1], State: f[2]}
		// Since is one or two fields; interval and timeout are the last two.
		s.Since = strings.Join(f[3:len(f)-2], " ")
		s.Interval = seconds(f[len(f)-2])
		s.Timeout = seconds(f[len(f)-1])
		out = append(out, s)
	}
	return out
}

// maxBFDSeconds is the longest BFD interval BIRD can show: it keeps them
// in microseconds, in 32 bits.
const maxBFDSeconds = float64(1<<32-1) / 1e6

// seconds reads a BFD interval ("0.100"); 0 when it is not one (not a
// number, NaN, negative, longer than BIRD can hold), never a wrapped value.
func seconds(s string) time.Duration {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || !(v >= 0 && v <= maxBFDSeconds) {
		return 0
	}
	return time.Duration(v * float64(time.Second))
}
