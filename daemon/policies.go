package daemon

import (
	"context"
	"errors"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/store"
)

// loadPolicyDir replaces the file policies with the directory's content.
// A file that does not load is refused as a whole and its previous
// policies stay in force. It reads local files only, never the store.
func (a *agent) loadPolicyDir() {
	a.policyDirMu.Lock()
	defer a.policyDirMu.Unlock()
	dir := a.policyDir
	if dir == "" {
		return
	}
	results, err := policy.LoadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			a.log.Debug("no policy directory", "dir", dir)
			results = nil
		} else {
			a.log.Error("cannot read the policy directory; policies in force stay", "dir", dir, "err", err)
			return
		}
	}
	a.sync.SetFilePolicies(results)
	a.trigger()
}

// policyWatch follows the store's cluster-wide policies (an anchored
// prefix: anchor.go).
func (a *agent) policyWatch(ctx context.Context) {
	a.watchAnchored(ctx, store.PolicyPrefix, func(kvs []store.KV) {
		a.sync.SetStorePolicies(kvs)
		a.trigger()
	})
}

// importPolicies writes policies to the store, then applies the store's
// list at once (rather than on the watch's next turn) so that the maps hold
// them when the call returns.
func (a *agent) importPolicies(ctx context.Context, file string, data []byte) ([]api.PolicySummary, error) {
	if file == "" {
		file = "request"
	}
	ps, err := policy.Load(file, data)
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "fix the document; nothing was imported", "%v", err)
	}
	if len(ps) == 0 {
		return nil, api.Errorf(http.StatusBadRequest, "", "%s holds no policy", file)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out := []api.PolicySummary{}
	for _, p := range ps {
		b, err := policy.EncodeStoreValue(p)
		if err != nil {
			return out, err
		}
		if err := a.st.Put(ctx, store.PolicyKey(p.Metadata.Name), b, store.PutOptions{}); err != nil {
			return out, api.Errorf(http.StatusServiceUnavailable, "check the store with `rackwire status`; policies imported before this one stay", "store policy %s: %v", p.Metadata.Name, err)
		}
		out = append(out, api.PolicySummary{Name: p.Metadata.Name, Source: policy.SourceStore(p.Metadata.Name), Rules: len(p.Rules())})
	}
	a.applyStorePoliciesNow(ctx)
	return out, nil
}

func (a *agent) applyStorePoliciesNow(ctx context.Context) {
	if kvs, _, err := a.st.List(ctx, store.PolicyPrefix); err == nil {
		a.sync.SetStorePolicies(kvs)
	}
	a.sync.Sync()
}

func (a *agent) deletePolicy(ctx context.Context, name string) error {
	for _, l := range a.pol.Policies() {
		if l.Policy.Metadata.Name == name && strings.HasPrefix(l.Source, "file:") {
			return api.Errorf(http.StatusConflict, "remove it from that file and reload (systemctl reload rackwired)", "policy %q comes from %s, not from the store", name, strings.TrimPrefix(l.Source, "file:"))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := a.st.Get(ctx, store.PolicyKey(name)); errors.Is(err, store.ErrNotFound) {
		return api.Errorf(http.StatusNotFound, "list them with `rackwire policy list`", "no store policy named %q", name)
	}
	if err := a.st.Delete(ctx, store.PolicyKey(name)); err != nil {
		return err
	}
	a.applyStorePoliciesNow(ctx)
	return nil
}
