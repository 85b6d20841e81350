// The fan-out bench's subscriber client (perf/bench_results_fanout.py builds and runs it):
// many Server-Sent Events streams on one results role, the receipt time and total of each
// event, and the delay of every update from its publication to each stream.
//
// It speaks the same protocol on stdin/stdout as the bench's Python client, one JSON line
// each way per command: {"host","port","count"} opens `count` streams and answers once
// every stream showed its first event (or its wait ran out); {"published":[t1,...]} (the
// monotonic times of the updates' merges) answers the delays. Times are CLOCK_MONOTONIC
// seconds, the clock of Python's time.monotonic(), so the driver and the clients of one
// machine share one clock. Written in Go because the Python client took a core of its own
// at 20,000 streams (2 cores shared with the server): the clients must not limit the result.
// The standard library only, Go 1.19 (Debian bookworm's golang-go).
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const (
	connectsInFlightMax = 256
	connectWait         = 30 * time.Second
	firstEventWait      = 30 * time.Second
	readBufferBytes     = 2048
	pendingBytesMax     = 4096 // a partial event kept between reads, bounded
	eventsPerStreamMax  = 4096 // the bench sends at most 600 updates: room for keep-alives
	failuresKeptMax     = 5
)

var totalMarker = []byte(`"total":`)

type event struct {
	at    float64 // CLOCK_MONOTONIC seconds
	total int64
}

type stream struct {
	mu      sync.Mutex
	events  []event
	closed  bool
	dropped int
	first   chan struct{}
}

// The monotonic clock read once through the system call, then advanced with Go's own
// monotonic reading (vDSO, no system call per event).
var clockBase = time.Now()
var clockBaseSeconds = monotonicSeconds()

func monotonicSeconds() float64 {
	var ts syscall.Timespec
	const clockMonotonic = 1
	_, _, errno := syscall.Syscall(syscall.SYS_CLOCK_GETTIME, clockMonotonic,
		uintptr(unsafe.Pointer(&ts)), 0)
	if errno != 0 {
		fatal("clock_gettime: %v", errno)
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func now() float64 {
	return clockBaseSeconds + time.Since(clockBase).Seconds()
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "sse_client: "+format+"\n", args...)
	os.Exit(2)
}

// read parses events from one connection: per read, the last total before the last blank
// line (an event's end) is one event at the read's time, as the Python client does.
func (s *stream) read(conn net.Conn) {
	defer func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		conn.Close()
	}()
	buffer := make([]byte, readBufferBytes)
	var pending []byte
	signalled := false
	for {
		n, err := conn.Read(buffer)
		if n > 0 {
			at := now()
			data := append(pending, buffer[:n]...)
			end := bytes.LastIndex(data, []byte("\n\n"))
			if end < 0 {
				pending = keepTail(data)
				continue
			}
			if marker := bytes.LastIndex(data[:end], totalMarker); marker >= 0 {
				start := marker + len(totalMarker)
				stop := start
				for stop < len(data) && data[stop] >= '0' && data[stop] <= '9' {
					stop++
				}
				total, parseErr := strconv.ParseInt(string(data[start:stop]), 10, 64)
				if parseErr == nil {
					s.mu.Lock()
					if len(s.events) < eventsPerStreamMax {
						s.events = append(s.events, event{at, total})
					} else {
						s.dropped++
					}
					s.mu.Unlock()
					if !signalled {
						close(s.first)
						signalled = true
					}
				}
			}
			pending = keepTail(data[end+2:])
		}
		if err != nil {
			return
		}
	}
}

func keepTail(data []byte) []byte {
	if len(data) > pendingBytesMax {
		data = data[len(data)-pendingBytesMax:]
	}
	return append([]byte(nil), data...)
}

type connectCommand struct {
	Host  string `json:"host"`
	Port  int    `json:"port"`
	Count int    `json:"count"`
}

type publishedCommand struct {
	Published []float64 `json:"published"`
}

func answer(document map[string]interface{}) {
	line, err := json.Marshal(document)
	if err != nil {
		fatal("encoding an answer: %v", err)
	}
	os.Stdout.Write(append(line, '\n'))
}

func connectAll(command connectCommand) ([]*stream, []string, int, float64) {
	request := []byte(fmt.Sprintf("GET /v1/polls/fanout/results/stream HTTP/1.1\r\nHost: %s\r\n"+
		"Accept: text/event-stream\r\n\r\n", command.Host))
	address := net.JoinHostPort(command.Host, strconv.Itoa(command.Port))
	streams := make([]*stream, 0, command.Count)
	var failures []string
	failed := 0
	var mu sync.Mutex
	gate := make(chan struct{}, connectsInFlightMax)
	var group sync.WaitGroup
	started := time.Now()
	for i := 0; i < command.Count; i++ {
		group.Add(1)
		gate <- struct{}{}
		go func() {
			defer group.Done()
			defer func() { <-gate }()
			conn, err := net.DialTimeout("tcp", address, connectWait)
			if err == nil {
				_, err = conn.Write(request)
			}
			if err != nil {
				mu.Lock()
				failed++
				if len(failures) < failuresKeptMax {
					failures = append(failures, err.Error())
				}
				mu.Unlock()
				return
			}
			s := &stream{first: make(chan struct{})}
			mu.Lock()
			streams = append(streams, s)
			mu.Unlock()
			go s.read(conn)
			select { // the first event came: the stream is admitted
			case <-s.first:
			case <-time.After(firstEventWait):
			}
		}()
	}
	group.Wait()
	return streams, failures, failed, time.Since(started).Seconds()
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		fatal("getrusage: %v", err)
	}
	return float64(usage.Utime.Sec+usage.Stime.Sec) + float64(usage.Utime.Usec+usage.Stime.Usec)/1e6
}

// delays: per stream and update k (total k), ms from k's publication to the first event
// with a total >= k; an update no event reached adds no delay (it counts as incomplete).
func delays(streams []*stream, published []float64) (map[string]interface{}, []float32) {
	var values []float32
	complete, distinct, dropped := 0, 0, 0
	for _, s := range streams {
		s.mu.Lock()
		events := append([]event(nil), s.events...)
		dropped += s.dropped
		s.mu.Unlock()
		totals := map[int64]bool{}
		for _, e := range events {
			totals[e.total] = true
		}
		if len(events) > 0 && events[len(events)-1].total >= int64(len(published)) {
			complete++
		}
		every := true
		for k := 1; k <= len(published); k++ {
			if !totals[int64(k)] {
				every = false
				break
			}
		}
		if every {
			distinct++
		}
		index := 0
		for k, publishedAt := range published {
			for index < len(events) && events[index].total < int64(k+1) {
				index++
			}
			if index == len(events) {
				break
			}
			values = append(values, float32((events[index].at-publishedAt)*1000))
		}
	}
	return map[string]interface{}{"complete": complete, "distinct": distinct,
		"streams": len(streams), "events_dropped": dropped}, values
}

func encodeFloats(values []float32) string {
	raw := make([]byte, 4*len(values))
	for i, value := range values {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(value))
	}
	return base64.StdEncoding.EncodeToString(raw)
}

func main() {
	input := bufio.NewReaderSize(os.Stdin, 1<<26)
	var command connectCommand
	if err := readCommand(input, &command); err != nil {
		fatal("reading the connect command: %v", err)
	}
	streams, failures, failed, connectS := connectAll(command)
	ready := 0
	for _, s := range streams {
		select {
		case <-s.first:
			ready++
		default:
		}
	}
	if failures == nil {
		failures = []string{}
	}
	answer(map[string]interface{}{"connected": len(streams), "ready": ready,
		"failures": failures, "failed": failed, "connect_s": math.Round(connectS*100) / 100})
	cpuBefore := cpuSeconds()
	var published publishedCommand
	if err := readCommand(input, &published); err != nil {
		fatal("reading the publication times: %v", err)
	}
	cpuAfter := cpuSeconds()
	outcome, values := delays(streams, published.Published)
	outcome["cpu_s_during_updates"] = math.Round((cpuAfter-cpuBefore)*1000) / 1000
	outcome["delays_ms"] = encodeFloats(values)
	answer(outcome)
}

func readCommand(input *bufio.Reader, into interface{}) error {
	line, err := input.ReadBytes('\n')
	if err != nil {
		return err
	}
	return json.Unmarshal(line, into)
}
