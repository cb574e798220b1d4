package daemon

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/datapath"
)

// serveMonitor streams datapath events as JSON lines until the client goes.
func (a *agent) serveMonitor(w http.ResponseWriter, r *http.Request) {
	typ := r.URL.Query().Get("type")
	if typ != "" && typ != "drop" && typ != "trace" && typ != "audit" {
		api.WriteError(w, api.Errorf(http.StatusBadRequest, "", "--type %q: write drop, trace or audit", typ))
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		api.WriteError(w, errors.New("streaming unsupported"))
		return
	}
	evs, done := a.mon.subscribe()
	defer func() {
		if lost := done(); lost > 0 {
			a.log.Info("monitor client lost events (too slow)", "lost", lost)
		}
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	fl.Flush()
	enc := json.NewEncoder(w)
	keep := time.NewTicker(15 * time.Second)
	defer keep.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-keep.C:
			_, _ = w.Write([]byte("\n"))
			fl.Flush()
		case it := <-evs:
			var out api.Event
			if it.notice {
				// Suppressed events may be of any type: always shown.
				out = a.toAPINotice(it)
			} else {
				v := eventVerdict(it.ev)
				if typ != "" && typ != v {
					continue
				}
				out = a.toAPIEvent(it.ev, v)
			}
			if err := enc.Encode(out); err != nil {
				return
			}
			fl.Flush()
		}
	}
}

func eventVerdict(ev datapath.Event) string {
	switch ev.Verdict {
	case datapath.Dropped:
		return "drop"
	case datapath.Audited:
		return "audit"
	}
	return "trace"
}

// toAPINotice describes the events of one endpoint the rate limit
// suppressed (and the transport lost) in the last interval.
func (a *agent) toAPINotice(it monitorItem) api.Event {
	out := api.Event{Time: it.ev.Time, Type: api.EventSuppressed, Endpoint: it.ev.Endpoint,
		Suppressed: it.suppressed, Lost: it.lost, Limit: eventLimitText(a.dp.EventLimit())}
	out.EndpointName = a.endpointName(it.ev.Endpoint)
	return out
}

// endpointName is the name of endpoint id, or "" when there is none.
func (a *agent) endpointName(id uint16) string {
	if ep, err := a.eps.Get(strconv.Itoa(int(id))); err == nil {
		return ep.Name
	}
	return ""
}

func (a *agent) toAPIEvent(ev datapath.Event, typ string) api.Event {
	out := api.Event{
		Time: ev.Time, Type: typ, Endpoint: ev.Endpoint, Direction: ev.Direction.String(),
		Src: ev.Src.String(), Dst: ev.Dst.String(), Proto: api.ProtoName(ev.Proto),
		SrcIdentity: ev.SrcIdentity, SrcLabels: a.labelsOf(ev.SrcIdentity),
		DstIdentity: ev.DstIdentity, DstLabels: a.labelsOf(ev.DstIdentity),
		Verdict: ev.Verdict.String(), Len: ev.Len,
	}
	if ev.Reason != 0 {
		out.Reason = ev.Reason.String()
	}
	if typ == "audit" {
		out.Verdict = "audit: would deny"
	}
	if ev.Service != nil {
		out.VIP = ev.Service.VIP.String()
	}
	out.EndpointName = a.endpointName(ev.Endpoint)
	return out
}
