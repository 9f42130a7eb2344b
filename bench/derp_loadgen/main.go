// Command derp_loadgen drives a DERP relay (ours or Tailscale's derper) with several
// client pairs, using Tailscale's own published DERP client package, and reports the
// packets and bytes the receivers got.
//
//	derp_loadgen genkeys -n 8 -priv keys.priv -pub keys.pub
//	derp_loadgen run -priv keys.priv -url http://127.0.0.1:3340/derp -pairs 4 -duration 10s
//	derp_loadgen run ... -url2 http://127.0.0.1:3341/derp   # receivers on a second replica
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

func main() {
	if len(os.Args) < 2 {
		log.Fatal("usage: derp_loadgen genkeys|run [flags]")
	}
	switch os.Args[1] {
	case "genkeys":
		genkeys(os.Args[2:])
	case "run":
		run(os.Args[2:])
	default:
		log.Fatalf("unknown command %q", os.Args[1])
	}
}

func genkeys(args []string) {
	fs := flag.NewFlagSet("genkeys", flag.ExitOnError)
	n := fs.Int("n", 8, "number of keys")
	privPath := fs.String("priv", "keys.priv", "private keys out (base64 raw, one a line)")
	pubPath := fs.String("pub", "keys.pub", "public keys out (base64 raw, one a line)")
	fs.Parse(args)
	var priv, pub strings.Builder
	for i := 0; i < *n; i++ {
		var raw [32]byte
		_, err := rand.Read(raw[:])
		must(err)
		k := key.NodePrivateFromRaw32(mem.B(raw[:]))
		p := k.Public().Raw32()
		priv.WriteString(base64.StdEncoding.EncodeToString(raw[:]) + "\n")
		pub.WriteString(base64.StdEncoding.EncodeToString(p[:]) + "\n")
	}
	must(os.WriteFile(*privPath, []byte(priv.String()), 0o600))
	must(os.WriteFile(*pubPath, []byte(pub.String()), 0o644))
}

func loadKeys(path string) []key.NodePrivate {
	data, err := os.ReadFile(path)
	must(err)
	var keys []key.NodePrivate
	for _, line := range strings.Fields(string(data)) {
		raw, err := base64.StdEncoding.DecodeString(line)
		must(err)
		keys = append(keys, key.NodePrivateFromRaw32(mem.B(raw)))
	}
	return keys
}

// dial does the HTTP upgrade by hand (GET /derp, Upgrade: DERP, 101) and then hands the
// raw connection to derp.NewClient, exactly what Tailscale's derphttp client does.
func dial(rawURL string, k key.NodePrivate) (*derp.Client, net.Conn) {
	u, err := url.Parse(rawURL)
	must(err)
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	must(err)
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	brw := bufio.NewReadWriter(bufio.NewReaderSize(conn, 64<<10), bufio.NewWriterSize(conn, 64<<10))
	req, err := http.NewRequest("GET", rawURL, nil)
	must(err)
	req.Header.Set("Upgrade", "DERP")
	req.Header.Set("Connection", "Upgrade")
	must(req.Write(brw))
	must(brw.Flush())
	resp, err := http.ReadResponse(brw.Reader, req)
	must(err)
	if resp.StatusCode != http.StatusSwitchingProtocols {
		log.Fatalf("upgrade refused: %s", resp.Status)
	}
	c, err := derp.NewClient(k, conn, brw, func(string, ...any) {}, derp.CanAckPings(true))
	must(err)
	return c, conn
}

type result struct {
	Pairs       int     `json:"pairs"`
	Size        int     `json:"size"`
	Seconds     float64 `json:"seconds"`
	Sent        int64   `json:"sent"`
	Received    int64   `json:"received"`
	PacketsPerS float64 `json:"packets_per_s"`
	Mbits       float64 `json:"mbit_per_s"`
}

func run(args []string) {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	privPath := fs.String("priv", "keys.priv", "private keys (2 per pair)")
	rawURL := fs.String("url", "http://127.0.0.1:3340/derp", "relay URL for senders (and receivers)")
	url2 := fs.String("url2", "", "if set, receivers connect here (another replica)")
	pairs := fs.Int("pairs", 4, "client pairs (sender -> receiver)")
	size := fs.Int("size", 1400, "packet size in bytes")
	duration := fs.Duration("duration", 10*time.Second, "measured duration")
	warmup := fs.Duration("warmup", time.Second, "unmeasured warmup")
	window := fs.Int64("window", 128, "max packets a sender keeps in flight beyond what its receiver got (0 = open loop)")
	stall := fs.Duration("stall", 5*time.Millisecond, "no receiver progress for this long: write outstanding packets off as lost")
	fs.Parse(args)
	keys := loadKeys(*privPath)
	if len(keys) < 2**pairs {
		log.Fatalf("need %d keys, have %d", 2**pairs, len(keys))
	}
	recvURL := *rawURL
	if *url2 != "" {
		recvURL = *url2
	}
	type pair struct {
		sender, receiver *derp.Client
		sconn, rconn     net.Conn
		received         atomic.Int64 // all packets, for the send window
		measured         atomic.Int64 // packets inside the measured interval
		sent             atomic.Int64
	}
	ps := make([]*pair, *pairs)
	for i := range ps {
		s, sc := dial(*rawURL, keys[2*i])
		r, rc := dial(recvURL, keys[2*i+1])
		ps[i] = &pair{sender: s, receiver: r, sconn: sc, rconn: rc}
	}
	// Give replicas time to share presence before traffic starts.
	time.Sleep(500 * time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	var measuring atomic.Bool
	var wg sync.WaitGroup
	payload := make([]byte, *size)
	for _, p := range ps {
		p := p
		wg.Add(2)
		go func() { // receiver
			defer wg.Done()
			for {
				m, err := p.receiver.Recv()
				if err != nil {
					return
				}
				switch m := m.(type) {
				case derp.ReceivedPacket:
					p.received.Add(1)
					if measuring.Load() {
						p.measured.Add(1)
					}
				case derp.PingMessage:
					p.receiver.SendPong(m)
				}
			}
		}()
		go func() { // sender: keeps a bounded window in flight so a slow relay is not
			// simply flooded into dropping (both relays get the same closed-loop load).
			defer wg.Done()
			go func() {
				for {
					m, err := p.sender.Recv()
					if err != nil {
						return
					}
					if pm, ok := m.(derp.PingMessage); ok {
						p.sender.SendPong(pm)
					}
				}
			}()
			dst := p.receiver.PublicKey()
			// Closed loop: at most -window packets beyond what the receiver has counted.
			// Packets a relay dropped never arrive, so when the receiver makes no progress
			// for -stall the outstanding ones are written off as lost.
			var local, lost int64
			var lastGot int64 = -1
			lastProgress := time.Now()
			for ctx.Err() == nil {
				if *window > 0 {
					got := p.received.Load()
					if got != lastGot {
						lastGot, lastProgress = got, time.Now()
					}
					if local-got-lost > *window {
						if time.Since(lastProgress) > *stall {
							lost = local - got
							lastProgress = time.Now()
						} else {
							time.Sleep(20 * time.Microsecond)
						}
						continue
					}
				}
				if err := p.sender.Send(dst, payload); err != nil {
					return
				}
				local++
				if measuring.Load() {
					p.sent.Add(1)
				}
			}
		}()
	}
	time.Sleep(*warmup)
	measuring.Store(true)
	start := time.Now()
	time.Sleep(*duration)
	measuring.Store(false)
	elapsed := time.Since(start).Seconds()
	cancel()
	var sent, received int64
	for _, p := range ps {
		sent += p.sent.Load()
		received += p.measured.Load()
		p.sconn.Close()
		p.rconn.Close()
	}
	wg.Wait()
	res := result{
		Pairs: *pairs, Size: *size, Seconds: elapsed, Sent: sent, Received: received,
		PacketsPerS: float64(received) / elapsed,
		Mbits:       float64(received) * float64(*size) * 8 / elapsed / 1e6,
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

func must(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
