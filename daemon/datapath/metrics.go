package datapath

import (
	"fmt"
)

// Metric is one counter of rw_metrics, summed over CPUs.
type Metric struct {
	Reason    Reason    `json:"reason"`
	Direction Direction `json:"direction"`
	Packets   uint64    `json:"packets"`
	Bytes     uint64    `json:"bytes"`
}

// Metrics returns every non-zero counter by reason and direction.
func (d *Datapath) Metrics() ([]Metric, error) {
	var out []Metric
	for i := uint32(0); i < reasonCount*2; i++ {
		var per []metricsValue
		if err := d.maps["rw_metrics"].Lookup(i, &per); err != nil {
			return nil, fmt.Errorf("read rw_metrics %d: %w", i, err)
		}
		m := Metric{Reason: -Reason(i / 2), Direction: Direction(i % 2)}
		for _, v := range per {
			m.Packets += v.Packets
			m.Bytes += v.Bytes
		}
		if m.Packets > 0 {
			out = append(out, m)
		}
	}
	return out, nil
}
