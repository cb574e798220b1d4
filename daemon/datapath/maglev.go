package datapath

import (
	"encoding/binary"
	"hash/fnv"
)

// maglevM is the number of slots of every service's Maglev table
// (RW_MAGLEV_M in bpf/service.h): a prime, so every skip visits every slot.
// It bounds a service's active backends (maglevMaxBackends); with N
// backends each one owns M/N slots give or take one, so the spread is
// within 1% of even up to ~10 backends and within 10% up to ~100.
const maglevM = 1021

// maglevMaxBackends is the most active backends one service may have: a
// tenth of the slots, so each backend owns at least ~10 of them and the
// spread stays within ±10% of even.
const maglevMaxBackends = maglevM / 10

// maglevTable fills a Maglev lookup table of m slots (m prime) for the
// backends named in names (distinct; order does not matter: the result
// depends only on the set): slot -> index into names. Each backend walks
// its own permutation of the slots (offset and skip from two hashes of
// its name) and the backends take turns claiming their next free slot
// until all are taken (Eisenbud et al., "Maglev", NSDI 2016). So every
// backend gets m/n slots give or take one, and removing one backend
// re-assigns mostly the slots it held. An empty names gives nil.
func maglevTable(names []string, m int) []int {
	n := len(names)
	if n == 0 || m <= 0 {
		return nil
	}
	offset := make([]uint64, n)
	skip := make([]uint64, n)
	for i, name := range names {
		h1, h2 := maglevHashes(name)
		offset[i] = h1 % uint64(m)
		skip[i] = h2%uint64(m-1) + 1
		if m == 1 {
			skip[i] = 1
		}
	}
	// Turn order by name, so the table does not depend on input order.
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	sortByName(order, names)
	table := make([]int, m)
	for i := range table {
		table[i] = -1
	}
	next := make([]uint64, n)
	filled := 0
	for filled < m {
		for _, i := range order {
			c := (offset[i] + next[i]*skip[i]) % uint64(m)
			for table[c] >= 0 {
				next[i]++
				c = (offset[i] + next[i]*skip[i]) % uint64(m)
			}
			table[c] = i
			next[i]++
			filled++
			if filled == m {
				break
			}
		}
	}
	return table
}

func maglevHashes(name string) (uint64, uint64) {
	h := fnv.New64a()
	h.Write([]byte(name))
	a := h.Sum64()
	h.Reset()
	var salt [8]byte
	binary.LittleEndian.PutUint64(salt[:], 0x9e3779b97f4a7c15)
	h.Write(salt[:])
	h.Write([]byte(name))
	return a, h.Sum64()
}

// sortByName sorts the indices in order by names[i] (insertion sort:
// services have few backends).
func sortByName(order []int, names []string) {
	for i := 1; i < len(order); i++ {
		for j := i; j > 0 && names[order[j]] < names[order[j-1]]; j-- {
			order[j], order[j-1] = order[j-1], order[j]
		}
	}
}
