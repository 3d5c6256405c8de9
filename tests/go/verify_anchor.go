// verify_anchor checks a Grantline anchor with Go's own golang.org/x/mod/sumdb
// note and tlog packages: the checkpoint's signed note, the Merkle root of the
// published entry bundles, every inclusion and consistency proof between
// them, and offline receipts (c2sp.org/tlog-proof) made by `grantline audit
// prove`. Run in GOPATH mode against Debian's golang-golang-x-mod-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go run verify_anchor.go VKEY ANCHOR_DIR [PROOF_FILE...]
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "verify_anchor: "+format+"\n", args...)
	os.Exit(1)
}

// indexPath writes N in the tlog-tiles form: x001/x234/067.
func indexPath(n int64) string {
	s := strconv.FormatInt(n, 10)
	for len(s)%3 != 0 {
		s = "0" + s
	}
	var parts []string
	for i := 0; i < len(s); i += 3 {
		p := s[i : i+3]
		if i+3 < len(s) {
			p = "x" + p
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "/")
}

type memReader struct{ hashes []tlog.Hash }

func (m *memReader) ReadHashes(indexes []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(indexes))
	for i, x := range indexes {
		if x < 0 || x >= int64(len(m.hashes)) {
			return nil, fmt.Errorf("no stored hash %d", x)
		}
		out[i] = m.hashes[x]
	}
	return out, nil
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: verify_anchor VKEY ANCHOR_DIR [PROOF_FILE...]")
	}
	verifier, err := note.NewVerifier(strings.TrimSpace(os.Args[1]))
	if err != nil {
		fail("verifier key: %v", err)
	}
	anchor := os.Args[2]
	raw, err := os.ReadFile(filepath.Join(anchor, "checkpoint"))
	if err != nil {
		fail("%v", err)
	}
	n, err := note.Open(raw, note.VerifierList(verifier))
	if err != nil {
		fail("checkpoint note: %v", err)
	}
	lines := strings.Split(n.Text, "\n")
	if len(lines) < 4 || lines[0] != verifier.Name() {
		fail("checkpoint body %q", n.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("checkpoint size: %v", err)
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		fail("checkpoint root: %v", err)
	}

	r := &memReader{}
	var leaves []tlog.Hash
	for start := int64(0); start < size; start += 256 {
		width := size - start
		path := filepath.Join(anchor, "tile", "entries", indexPath(start/256))
		if width < 256 {
			path += ".p/" + strconv.FormatInt(width, 10)
		} else {
			width = 256
		}
		bundle, err := os.ReadFile(path)
		if err != nil {
			fail("%v", err)
		}
		for i := int64(0); i < width; i++ {
			if len(bundle) < 2 {
				fail("%s is truncated", path)
			}
			l := int(binary.BigEndian.Uint16(bundle))
			entry := bundle[2 : 2+l]
			bundle = bundle[2+l:]
			hashes, err := tlog.StoredHashes(int64(len(leaves)), entry, r)
			if err != nil {
				fail("stored hashes: %v", err)
			}
			r.hashes = append(r.hashes, hashes...)
			leaves = append(leaves, tlog.RecordHash(entry))
		}
	}
	got, err := tlog.TreeHash(size, r)
	if err != nil || got != root {
		fail("the entries hash to %v, the checkpoint says %v (%v)", got, root, err)
	}
	for i := int64(0); i < size; i++ {
		p, err := tlog.ProveRecord(size, i, r)
		if err != nil || tlog.CheckRecord(p, size, root, i, leaves[i]) != nil {
			fail("inclusion of %d: %v", i, err)
		}
	}
	for old := int64(1); old <= size; old++ {
		oldRoot, _ := tlog.TreeHash(old, r)
		p, err := tlog.ProveTree(size, old, r)
		if err != nil || tlog.CheckTree(p, size, root, old, oldRoot) != nil {
			fail("consistency %d -> %d: %v", old, size, err)
		}
	}
	// Offline receipts made by grantline: index, proof hashes, checkpoint.
	for _, file := range os.Args[3:] {
		text, err := os.ReadFile(file)
		if err != nil {
			fail("%v", err)
		}
		parts := bytes.SplitN(text, []byte("\n\n"), 2)
		head := strings.Split(string(parts[0]), "\n")
		if head[0] != "c2sp.org/tlog-proof@v1" || !strings.HasPrefix(head[1], "index ") {
			fail("%s is not a tlog-proof", file)
		}
		index, _ := strconv.ParseInt(strings.TrimPrefix(head[1], "index "), 10, 64)
		var proof tlog.RecordProof
		for _, line := range head[2:] {
			h, err := base64.StdEncoding.DecodeString(line)
			if err != nil || len(h) != 32 {
				fail("%s: bad proof line", file)
			}
			var hash tlog.Hash
			copy(hash[:], h)
			proof = append(proof, hash)
		}
		pn, err := note.Open(parts[1], note.VerifierList(verifier))
		if err != nil {
			fail("%s: checkpoint: %v", file, err)
		}
		pl := strings.Split(pn.Text, "\n")
		psize, _ := strconv.ParseInt(pl[1], 10, 64)
		proot, _ := tlog.ParseHash(pl[2])
		if err := tlog.CheckRecord(proof, psize, proot, index, leaves[index]); err != nil {
			fail("%s: %v", file, err)
		}
	}
	fmt.Printf("ok %d\n", size)
}
