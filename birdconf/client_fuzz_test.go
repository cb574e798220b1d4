package birdconf

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// errFuzzBudget is returned by fuzzConn once a reply has read more than
// any reply may be long.
var errFuzzBudget = errors.New("fuzz: reader budget exhausted")

// fuzzConn plays a BIRD control socket that sends data, then, if endless,
// data again and again, like a peer that never ends its reply. It stops
// with errFuzzBudget after budget bytes, so that no input can hang the
// fuzzer; a reader that reaches that point did not bound the reply.
type fuzzConn struct {
	data    []byte
	endless bool
	off     int
	read    int
	budget  int
}

func (c *fuzzConn) Read(p []byte) (int, error) {
	if c.read >= c.budget {
		return 0, errFuzzBudget
	}
	if c.off == len(c.data) {
		if !c.endless || len(c.data) == 0 {
			return 0, io.EOF
		}
		c.off = 0
	}
	n := copy(p[:min(len(p), c.budget-c.read)], c.data[c.off:])
	c.off += n
	c.read += n
	return n, nil
}

// encodeReply writes lines back in the control-socket protocol.
func encodeReply(lines Reply) []byte {
	var b bytes.Buffer
	for i, l := range lines {
		sep := '-'
		if i == len(lines)-1 {
			sep = ' '
		}
		fmt.Fprintf(&b, "%04d%c%s\n", l.Code, sep, l.Text)
	}
	return b.Bytes()
}

// FuzzReadReply feeds arbitrary bytes as BIRD's side of the control socket
// to readReply and to the parsers of the replies the agent reads (show
// protocols, show protocols all, show bfd sessions). Properties: no panic;
// a reply is bounded (a peer that never ends a reply is cut off with an
// error, not read into memory without end); an accepted reply ends with a
// final line and encodes back to itself; the parsed values are sane.
func FuzzReadReply(f *testing.F) {
	f.Add([]byte("0001 BIRD 2.0.12 ready.\n"), uint8(0))
	f.Add([]byte("0003 Reconfigured\n"), uint8(0))
	f.Add([]byte("0002-Reading x\n+0015 spontaneous\n1002-a b\n c d\n0000 \n"), uint8(0))
	f.Add([]byte("8002 bad:1:1 syntax error\n0000 \n"), uint8(0))
	f.Add([]byte("2002-Name       Proto      Table      State  Since         Info\n"+
		"1002-rw_device  Device     ---        up     2024-05-01 12:00:00  \n"+
		" tor_a      BGP        ---        up     2024-05-01 12:00:01.123  Established   \n"+
		"1006-  BGP state:          Established\n    Neighbor address: 10.1.1.1\n    Neighbor AS:      65001\n"+
		"  Channel ipv4\n    State:          UP\n    Routes:         3 imported, 2 exported, 1 filtered, 0 preferred\n"+
		"0000 \n"), uint8(0))
	f.Add([]byte("1020-rw_bfd:\n IP address                Interface  State      Since         Interval  Timeout\n"+
		" 10.1.1.1                  eth0       Up         2024-05-01 12:00:00    0.100    0.300\n"+
		" fd00::1                   eth1       Down       12:00:00    NaN    1e300\n0000 \n"), uint8(0))
	f.Add([]byte("1002-a b c d e\n"), uint8(15))
	f.Add([]byte("x"), uint8(15))
	f.Add([]byte("hello\n"), uint8(0))
	f.Add([]byte("1002-"+strings.Repeat("x", 5000)), uint8(15))
	f.Fuzz(func(t *testing.T, data []byte, loop uint8) {
		// An endless peer costs maxReplySize bytes of reading: one input
		// in 16 is one, so that the others get the time.
		endless := loop%16 == 15
		const budget = 64 << 20
		c := &fuzzConn{data: data, endless: endless, budget: budget}
		rep, err := readReply(bufio.NewReader(c))
		if errors.Is(err, errFuzzBudget) || c.read > maxReplySize+64<<10 {
			t.Fatalf("readReply read %d bytes of one reply (input %q, endless %v): unbounded", c.read, data[:min(len(data), 64)], endless)
		}
		if err == nil {
			if len(rep) == 0 {
				t.Fatal("a reply without lines accepted")
			}
			for _, l := range rep {
				if l.Code < 0 || l.Code > 9999 || strings.ContainsAny(l.Text, "\n") || strings.HasSuffix(l.Text, "\r") {
					t.Fatalf("line %+v", l)
				}
			}
			again, err := readReply(bufio.NewReader(bytes.NewReader(encodeReply(rep))))
			if err != nil || !equalLines(again, rep) {
				t.Fatalf("round trip of %v: %v, %v", rep, again, err)
			}
			if last := rep[len(rep)-1]; (rep.Err() != nil) != (last.Code >= 8000) {
				t.Fatalf("Err() = %v for final code %d", rep.Err(), last.Code)
			}
		}
		// The parsers take any lines.
		for _, l := range rep {
			if p, ok := parseProtocolLine(l.Text); ok && (p.Name == "" || p.Proto == "") {
				t.Fatalf("protocol line %q parsed as %+v", l.Text, p)
			}
		}
		if d, err := parseProtocolDetail(rep); err == nil && d.Name == "" {
			t.Fatalf("detail without a protocol: %+v", d)
		} else if err == nil && (d.RoutesImported < 0 || d.RoutesExported < 0 || d.RoutesFiltered < 0) {
			t.Fatalf("negative route counts: %+v", d)
		}
		for _, s := range parseBFDSessions(rep) {
			if !s.Address.IsValid() || s.Interval < 0 || s.Timeout < 0 || s.Interval > maxBFDTime || s.Timeout > maxBFDTime {
				t.Fatalf("BFD session %+v", s)
			}
		}
	})
}

// maxBFDTime bounds the BFD times a session may report: BIRD keeps them
// in microseconds in 32 bits (about 71 minutes).
const maxBFDTime = time.Duration(1<<32-1) * time.Microsecond
